"""AlignerConfig: every knob of an Aligner SFT run (Ji et al. 2024, arXiv 2402.02416), validated up front.

The corrector is a causal LM trained by supervised fine-tuning on rows {question, answer, correction}:
it reads the question and the upstream model's answer through `template` and learns to write the
correction. Names and defaults follow transformers' TrainingArguments / TRL's SFTConfig (learning_rate
2e-5, cosine schedule, warmup_ratio, per_device_train_batch_size, gradient_accumulation_steps,
max_length, packing), with the paper's settings where it gives them. One optimizer step ("step") uses

    per_device_train_batch_size * gradient_accumulation_steps     rows,

and the run lasts max_steps steps when max_steps > 0, else ceil(num_train_epochs * rows / that). With identity rows
(identity_ratio > 0) and identity_schedule "warmup" (the paper's), the run first takes ceil(identity rows / that)
warm-up steps over the identity rows (each at least once: the last step is filled from another pass over them,
repeating rows when there are fewer than a step's), then its correction steps: max_steps in all when max_steps > 0,
else ceil(num_train_epochs * correction rows / that) after the warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from alignfast.ops._checks import fail, output_folder
from alignfast.trainer.config import BACKENDS, LR_SCHEDULERS, REPORTERS, SAVE_STRATEGIES, ConfigDict

# The paper's corrector input (PKU-Alignment/aligner), and the shorter form of the repository's data.
PAPER_TEMPLATE = ("BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more helpful "
                  "and harmless: {question} | {answer} ASSISTANT:")
REPO_TEMPLATE = "##Question: {question} ##Answer: {answer} ##Correction: "
NAMED_TEMPLATES = {"paper": PAPER_TEMPLATE, "repo": REPO_TEMPLATE}
IDENTITY_SCHEDULES = ("warmup", "mixed")


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class AlignerConfig(ConfigDict):
    """Configuration of AlignerTrainer (see the module docstring for the batch arithmetic)."""

    # --- run, output, logging -------------------------------------------------------------------
    output_dir: str = _opt("aligner-output", "Where metrics.jsonl, checkpoints and the final corrector go.")
    overwrite_output_dir: bool = _opt(False,
        "A fresh run in an output_dir that already holds one is an error unless this is true (then the earlier "
        "run's checkpoints and metrics are deleted first).")
    seed: int = _opt(42, "Seed of the data order, the identity rows and the model's dropout.")
    backend: str = _opt("fast",
        "'fast': the loss from the last hidden states with alignfast.ops.linear_token_logprobs (no [N, V] logits); "
        "'reference': full logits + torch cross_entropy (the plain SFT step), the spec.")
    device: str | None = _opt(None, "Move the corrector here (default: where it already is).")
    run_name: str | None = None
    report_to: list[str] | str = _opt("none", "'none', 'jsonl', 'tensorboard', 'wandb', 'all'; metrics.jsonl always.")
    logging_steps: int = _opt(10, "Log a line and call on_log callbacks every N steps; metrics.jsonl gets every step.")
    save_strategy: str = _opt("steps", "'steps': checkpoint every save_steps and at the end; 'no': never.")
    save_steps: int = _opt(500, "Checkpoint every N optimizer steps.")
    save_total_limit: int | None = _opt(None, "Keep at most this many checkpoints (oldest deleted).")

    # --- optimisation (TrainingArguments names; the paper's values) --------------------------------
    learning_rate: float = _opt(2e-5, "AdamW learning rate (the paper: 2e-5).")
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = _opt(1.0, "Clip the gradient norm (None: no clipping).")
    lr_scheduler_type: str = _opt("cosine", "transformers scheduler name, stepped once per optimizer step.")
    warmup_ratio: float = _opt(0.03, "Fraction of the steps with a linear warm-up.")
    warmup_steps: int = _opt(0, "Warm-up steps (overrides warmup_ratio when > 0).")
    num_train_epochs: float = 3.0
    max_steps: int = _opt(-1, "If > 0: the number of optimizer steps, overriding num_train_epochs.")
    per_device_train_batch_size: int = _opt(4, "Rows per micro-batch (one forward/backward).")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    per_device_eval_batch_size: int = _opt(8, "Rows per evaluation or generation batch.")

    # --- data and template -------------------------------------------------------------------------
    template: str = _opt("paper",
        "The corrector's input: a string with {question} and {answer}, or 'paper' (the paper's template) or 'repo' "
        "(the '##Question: ... ##Answer: ... ##Correction: ' form).")
    use_chat_template: bool = _opt(False,
        "Wrap the rendered template as a user turn of the corrector tokenizer's chat template (off: plain text, "
        "as the paper trains).")
    max_length: int = _opt(2048,
        "Tokens per row (prompt + correction + EOS). A longer row loses the end of its answer first; if the "
        "question and template still leave no room, the end of the correction (never its start).")
    packing: bool = _opt(False, "Rows are never packed together (only False is supported, as the paper trains).")
    identity_ratio: float = _opt(0.0,
        "Fraction of identity rows in the training set: rows (question, answer, answer) whose correction is the "
        "answer itself, drawn from the training rows (copy an answer as it is). 0 <= identity_ratio < 1; 0: none.")
    identity_schedule: str = _opt("warmup",
        "When the identity rows are trained (only with identity_ratio > 0). 'warmup' (the paper's): an identity "
        "warm-up first, ceil(identity rows / rows per step) steps over the identity rows alone, each at least "
        "once (the last step is filled from another pass over them, repeating rows when there are fewer than a "
        "step's); then "
        "the correction rows alone (the residual correction). 'mixed': the identity rows are shuffled in with the "
        "correction rows through the whole run, as one training set.")

    def __post_init__(self):
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        self.report_to = list(self.report_to)
        self._validate()

    # --- derived --------------------------------------------------------------------------------------
    @property
    def rows_per_step(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def template_text(self) -> str:
        return NAMED_TEMPLATES.get(self.template, self.template)

    def identity_steps(self, identity_rows: int) -> int:
        """The identity warm-up's steps: every identity row at least once (the last step completed from further passes
        over them, so that every step has rows_per_step rows: with fewer identity rows than that, rows repeat within
        the step); none when they are mixed in or there are none."""
        if self.identity_schedule != "warmup" or identity_rows <= 0:
            return 0
        return math.ceil(identity_rows / self.rows_per_step)

    def num_steps(self, dataset_size: int, identity_rows: int = 0) -> int:
        """Optimizer steps of the run over dataset_size rows, of which identity_rows are identity rows (see the module
        docstring): under the warm-up, its steps come first and the epochs count the correction rows."""
        warmup = self.identity_steps(identity_rows)
        if self.max_steps > 0:
            if warmup and self.max_steps <= warmup:
                fail("max_steps", f"({self.max_steps}) leaves no step for the correction rows after the identity "
                     f"warm-up's {warmup} steps (identity_schedule: warmup): raise it, or lower identity_ratio")
            return self.max_steps
        rows = dataset_size - identity_rows if warmup else dataset_size
        steps = math.ceil(self.num_train_epochs * rows / self.rows_per_step)
        if steps < 1:
            fail("num_train_epochs", f"gives no optimizer step for {rows} rows")
        return warmup + steps

    # --- validation -----------------------------------------------------------------------------------
    def _validate(self) -> None:
        self.output_dir = output_folder("output_dir", self.output_dir)

        def integer(name, *, minimum):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                fail(name, f"must be an integer >= {minimum}, got {v!r}")

        def number(name, *, lo=None, hi=None, lo_open=False, hi_open=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                fail(name, f"must be a finite number, got {v!r}")
            if lo is not None and (v < lo or (lo_open and v == lo)):
                fail(name, f"must be {'>' if lo_open else '>='} {lo}, got {v!r}")
            if hi is not None and (v > hi or (hi_open and v == hi)):
                fail(name, f"must be {'<' if hi_open else '<='} {hi}, got {v!r}")

        for name, allowed in (("backend", BACKENDS), ("save_strategy", SAVE_STRATEGIES),
                              ("lr_scheduler_type", LR_SCHEDULERS)):
            if getattr(self, name) not in allowed:
                fail(name, f"must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for r in self.report_to:
            if r not in REPORTERS:
                fail("report_to", f"entries must be in {list(REPORTERS)}, got {r!r}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size",
                     "logging_steps", "save_steps"):
            integer(name, minimum=1)
        integer("max_length", minimum=2)
        integer("warmup_steps", minimum=0)
        for name in ("seed", "max_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                fail(name, f"must be an integer, got {v!r}")
        if self.save_total_limit is not None:
            integer("save_total_limit", minimum=1)
        for name in ("overwrite_output_dir", "use_chat_template", "packing"):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.packing:
            fail("packing", "must be false: the Aligner is trained on one row per sequence (no packing)")
        number("learning_rate", lo=0, lo_open=True)
        number("weight_decay", lo=0)
        number("adam_beta1", lo=0, hi=1)
        number("adam_beta2", lo=0, hi=1)
        number("adam_epsilon", lo=0, lo_open=True)
        number("max_grad_norm", lo=0, lo_open=True, allow_none=True)
        number("warmup_ratio", lo=0, hi=1)
        number("num_train_epochs", lo=0, lo_open=True)
        number("identity_ratio", lo=0, hi=1, hi_open=True)
        if self.identity_schedule not in IDENTITY_SCHEDULES:
            fail("identity_schedule", f"must be one of {list(IDENTITY_SCHEDULES)} ('warmup': the identity rows first, "
                 f"as the paper trains; 'mixed': shuffled in with the corrections), got {self.identity_schedule!r}")
        if not isinstance(self.template, str):
            fail("template", f"must be a string, got {self.template!r}")
        text = self.template_text
        for name in ("{question}", "{answer}"):
            if name not in text:
                fail("template", f"must contain {name} (or be 'paper' or 'repo'), got {self.template!r}")
        from alignfast.aligner.data import check_template
        from alignfast.rollout.templates import warn_unknown_fields

        check_template(text, shown=self.template)
        warn_unknown_fields("template", text, ["question", "answer"])


def coerce_config(config) -> AlignerConfig:
    if isinstance(config, dict):
        return AlignerConfig.from_dict(config)
    if not isinstance(config, AlignerConfig):
        fail("config", f"must be an AlignerConfig or a dict, got {type(config).__name__}")
    return config
