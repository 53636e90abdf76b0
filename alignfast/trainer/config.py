"""AlignProConfig: every knob of an Align-Pro (or Oracle) PPO run, validated up front.

Field names and defaults follow TRL's PPOConfig (and the transformers TrainingArguments it inherits)
wherever TRL has the concept, so a TRL user can carry a config over; Align-Pro's own knobs are the
`target_*` fields and `rewrite_template`. One PPO iteration ("step") works on

    batch_size = per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches

episodes (prompts), then runs num_ppo_epochs passes of num_mini_batches optimizer steps over them.
The run lasts max_steps iterations when max_steps > 0, otherwise ceil(total_episodes / batch_size)
with total_episodes defaulting to num_train_epochs * len(train_dataset).

The paper's KL weight lambda is `kl_coef`; the optimum of the objective is
rho*(x'|x) proportional to rho_sft(x'|x) * exp(R(x, x') / kl_coef).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from alignfast.ops import _checks
from alignfast.ops._checks import AlignfastArgumentError, fail, optional_text, output_folder

BACKENDS = ("fast", "reference")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
VALUE_HEADS = ("separate", "shared")
SAVE_STRATEGIES = ("steps", "no")
REPORTERS = ("none", "jsonl", "tensorboard", "wandb", "all")
OPTIMIZERS = ("adamw_torch", "adamw_torch_8bit", "adamw_torch_4bit")  # alignfast/trainer/optimizers.py
FROZEN_DTYPES = ("bfloat16", "float16", "float32")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")

def _opt(default, help: str):
    """A dataclass field with its help text (read by the CLI and by `alignfast train --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


DEFAULT_REWRITE_TEMPLATE = (
    "Rewrite the following prompt so that an assistant gives the best possible answer. "
    "Reply with the rewritten prompt only.\n\nPrompt: {prompt}"
)


class ConfigDict:
    """Dict and JSON round trips for the trainers' config dataclasses (run files, checkpoints, metrics)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Build from a plain dict (YAML/JSON); an unknown key is an error that names it."""
        if not isinstance(d, dict):
            raise AlignfastArgumentError(f"alignfast: a config must be a mapping, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise AlignfastArgumentError(f"alignfast: unknown config key '{key}'{hint}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass
class AlignProConfig(ConfigDict):
    """Configuration of AlignProTrainer and OracleTrainer. See the module docstring for the batch arithmetic."""

    # --- run, output, logging -------------------------------------------------------------------
    output_dir: str = _opt("alignfast-output", "Where metrics.jsonl, checkpoints and the final model go.")
    overwrite_output_dir: bool = _opt(False,
        "A run started without resume_from_checkpoint in an output_dir that already holds one (checkpoints, "
        "metrics.jsonl) is an error unless this is true; then that run's checkpoints and metrics are deleted first.")
    seed: int = _opt(42, "Seed of every random choice (data order, sampling, mini-batch order).")
    backend: str = _opt("fast",
        "'fast': alignfast.ops fused kernels; 'reference': plain PyTorch (alignfast.reference, full logits), the "
        "spec.")
    device: str | None = _opt(None, "Device for the trained models; None keeps the prompter's device.")
    run_name: str | None = _opt(None, "Name of the run for TensorBoard / W&B.")
    report_to: str | list[str] = _opt("none",
        "'none', 'tensorboard', 'wandb', 'all', or a list; metrics.jsonl is always written.")
    logging_steps: int = _opt(10,
        "Log a line (python logging 'alignfast.trainer', INFO), call on_log callbacks and send to trackers "
        "every N steps; metrics.jsonl gets every step.")
    num_logged_samples: int = _opt(4, "Rollouts written to samples.jsonl at each logging step.")
    save_strategy: str = _opt("steps", "'steps': checkpoint every save_steps and at the end; 'no': never.")
    save_steps: int = _opt(500, "Checkpoint every N PPO steps.")
    save_total_limit: int | None = _opt(None, "Keep at most this many checkpoints (oldest deleted).")
    eval_steps: int | None = _opt(None, "Greedy rollouts on eval_dataset every N steps (logged as eval/scores).")
    per_device_eval_batch_size: int = _opt(8, "Prompts per greedy evaluation rollout batch.")

    # --- optimisation (TrainingArguments names) -------------------------------------------------
    learning_rate: float = _opt(5e-5, "AdamW learning rate.")
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = _opt(1.0, "Clip the gradient norm (None: no clipping).")
    lr_scheduler_type: str = _opt("linear", "transformers scheduler name, stepped once per PPO step that updates "
                                            "the policy (not after a Proxy-RLHF step without any decision).")
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    per_device_train_batch_size: int = _opt(8, "Episodes per micro-batch (one forward/backward).")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    num_mini_batches: int = _opt(1, "Optimizer steps per PPO epoch.")
    batch_size: int | None = _opt(None,
        "Episodes per PPO step; when given it must be a multiple of per_device_train_batch_size * "
        "gradient_accumulation_steps and sets num_mini_batches.")
    num_ppo_epochs: int = _opt(4, "Passes over each batch of rollouts.")
    total_episodes: int | None = _opt(None,
        "Episodes in the whole run (default num_train_epochs * len(train_dataset)).")
    num_train_epochs: float = 3.0
    max_steps: int = _opt(-1, "If > 0: the number of PPO steps, overriding total_episodes.")
    local_rollout_forward_batch_size: int = _opt(64, "Rows per no-grad forward pass in the rollout phase.")
    optim: str = _opt("adamw_torch",
        "Optimizer (TrainingArguments' names): 'adamw_torch' (exact AdamW, 8 bytes of state per float32 parameter), "
        "'adamw_torch_8bit' or 'adamw_torch_4bit' (torchao's block-quantised AdamW: ~2 or ~1 byte per parameter; "
        "needs torchao, `pip install alignfast[lowbit]`; the first step compiles its kernel, seconds to tens of "
        "seconds on CPU).")
    frozen_dtype: str | None = _opt(None,
        "dtype of the frozen reference policy with full fine-tuning ('bfloat16', 'float16', 'float32'; None: the "
        "policy's): bfloat16 halves its memory, its log-probs (the KL term) then carry bf16 rounding. The "
        "target's dtype is the target's own setting (target.dtype in a run file).")
    share_frozen_weights: bool = _opt(True,
        "With full fine-tuning, use the in-process target model as the reference policy when it holds the same "
        "weights (equal bit for bit, same architecture and dtype): one frozen copy instead of two, no numerics "
        "change; with LoRA, the policy's frozen base tensors become the target's. Off only to measure.")
    malloc_mmap_threshold: int | None = _opt(None,
        "glibc only: allocations of at least this many bytes get their own mapping, returned to the system when "
        "freed (65536 took 0.6-2.1 GiB off a 135M run's peak RSS: alignfast/trainer/allocator.py); None leaves the "
        "allocator alone. The same as MALLOC_MMAP_THRESHOLD_=<bytes> in the environment; process-wide.")
    gradient_checkpointing: bool = _opt(False,
        "Activation checkpointing of the policy's and the critic's decoder layers in the update: each layer keeps "
        "only its input and recomputes the rest in the backward (about a third more compute, a fraction of the "
        "activation memory); results are unchanged.")

    # --- PPO (TRL PPOConfig names and defaults) ---------------------------------------------------
    kl_coef: float = _opt(0.05, "lambda: weight of the per-token KL penalty to the SFT/reference policy.")
    kl_estimator: str = _opt("k1", "Per-token KL estimator in the reward: k1 (log-ratio), k2, k3, abs. "
                             "objective/kl and the adaptive controller use k1 or k3 (k1 for k2 and abs).")
    adap_kl_ctrl: bool = _opt(False,
        "Adapt kl_coef towards kl_target (Ziegler et al. 2019) instead of keeping it fixed.")
    kl_target: float = _opt(6.0, "Target sequence KL of the adaptive controller.")
    kl_horizon: int = _opt(10000, "Horizon (episodes) of the adaptive controller.")
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = _opt(0.0, "Entropy bonus weight in the policy loss (TRL: 0).")
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    whiten_advantages: bool = _opt(True, "Whiten advantages over the batch (TRL always does).")
    value_head: str = _opt("separate",
        "'separate': a critic with its own copy of the backbone (TRL); 'shared': a value head on the policy's "
        "backbone.")

    # --- the policy's sampling (TRL OnPolicyConfig names) ----------------------------------------
    response_length: int = _opt(53, "Max tokens the policy generates (the rewrite x', or the answer for Oracle).")
    temperature: float = _opt(0.7, "Sampling temperature of the policy (also used for its log-probs).")
    top_k: int = _opt(0, "Top-k sampling (0: off).")
    top_p: float = _opt(1.0, "Nucleus sampling (1.0: off).")
    stop_token_id: int | None = _opt(None, "An extra token id that ends the response (EOS always does).")
    missing_eos_penalty: float | None = _opt(None,
        "Subtracted from the score of responses that hit response_length without EOS.")
    max_prompt_length: int | None = _opt(None, "Keep at most the last N tokens of the policy's input.")
    reuse_sampler_logprobs: bool | None = _opt(None,
        "Fast path: take old log-probs (and a shared value head's values) from the sampler instead of a second "
        "forward (None: for float32 policies only).")
    torch_compile: bool = _opt(False,
        "Fast path: torch.compile each decoder layer of the policy, reference policy and critic (regional "
        "compilation, dynamic shapes) for the training and scoring forwards; the first step pays the compile "
        "(~15 s for a 135M Llama on a 2-core CPU). Results change by rounding only. Off by default: on that CPU it "
        "did not speed the step up measurably (bench/NOTES-trainer.md), and compiled layers keep ATen's GEMMs, "
        "giving up the oneDNN ones the fast path otherwise uses where they are faster (ALIGNFAST_CPU_GEMM).")

    # --- Align-Pro: the rewrite and the frozen target ---------------------------------------------
    rewrite_template: str = _opt(DEFAULT_REWRITE_TEMPLATE, "The prompter's instruction; must contain {prompt}.")
    target_prompt_template: str = _opt("{rewrite}",
        "What the target is asked: must contain {rewrite}; may contain {prompt}.")
    target_max_new_tokens: int = 64
    target_temperature: float = _opt(0.0, "0: greedy target answers.")
    target_top_p: float = 1.0
    target_num_samples: int = _opt(1, "Answers per rewrite; the reward is their mean.")
    target_batch_size: int = _opt(32, "Prompts per call to the target engine.")
    target_use_chat_template: bool = _opt(True,
        "Wrap the target prompt in the target tokenizer's chat template when it has one.")
    target_system_prompt: str | None = _opt(None,
        "The chat's system message before each target request (in the target tokenizer's chat template; an "
        "OpenAI-compatible target takes it as OpenAIEngine(system_prompt=...), the CLI's target.system_prompt). "
        "The Oracle arm's policy, the target itself, gets it too.")

    # --- rewards ------------------------------------------------------------------------------------
    reward_weights: list[float] | None = _opt(None, "Weights of [reward_model, *reward_funcs] (default all 1).")
    reward_template: str = _opt("{prompt}\n{completion}", "Reward-model input when its tokenizer has no chat template.")
    reward_batch_size: int = 32
    reward_label_index: int | None = _opt(None, "Which logit of a reward model with several labels is the reward "
                                          "(the run file's reward.label_index).")

    # ------------------------------------------------------------------------------------------------
    def __post_init__(self):
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        self.report_to = list(self.report_to)
        self._validate()

    # --- derived sizes ------------------------------------------------------------------------------
    @property
    def mini_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def rollout_batch_size(self) -> int:
        """Episodes per PPO step (TRL's batch_size)."""
        return self.mini_batch_size * self.num_mini_batches

    def num_steps(self, dataset_size: int) -> int:
        """PPO steps of the run for a train set of `dataset_size` prompts."""
        if self.max_steps > 0:
            return self.max_steps
        total = self.total_episodes
        if total is None:
            total = int(self.num_train_epochs * dataset_size)
        steps = math.ceil(total / self.rollout_batch_size)
        if steps < 1:
            fail("total_episodes", f"gives no PPO step: {total} episodes < batch of {self.rollout_batch_size}")
        return steps

    # --- validation ---------------------------------------------------------------------------------
    def _validate(self) -> None:
        self.output_dir = output_folder("output_dir", self.output_dir)

        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                fail(name, f"must be a positive integer, got {v!r}")

        def number(name, *, lo=None, hi=None, lo_open=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                fail(name, f"must be a finite number, got {v!r}")
            if lo is not None and (v < lo or (lo_open and v == lo)):
                fail(name, f"must be {'>' if lo_open else '>='} {lo}, got {v!r}")
            if hi is not None and v > hi:
                fail(name, f"must be <= {hi}, got {v!r}")

        def one_of(name, allowed):
            v = getattr(self, name)
            if v not in allowed:
                fail(name, f"must be one of {list(allowed)}, got {v!r}")

        one_of("backend", BACKENDS)
        one_of("kl_estimator", KL_ESTIMATORS)
        one_of("value_head", VALUE_HEADS)
        one_of("save_strategy", SAVE_STRATEGIES)
        one_of("lr_scheduler_type", LR_SCHEDULERS)
        one_of("optim", OPTIMIZERS)
        if self.frozen_dtype is not None:
            one_of("frozen_dtype", FROZEN_DTYPES)
        for r in self.report_to:
            if r not in REPORTERS:
                fail("report_to", f"entries must be in {list(REPORTERS)}, got {r!r}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches",
                     "num_ppo_epochs", "response_length", "target_max_new_tokens", "target_num_samples",
                     "target_batch_size", "local_rollout_forward_batch_size", "logging_steps", "save_steps",
                     "per_device_eval_batch_size", "reward_batch_size", "kl_horizon"):
            positive_int(name)
        for name in ("overwrite_output_dir", "adap_kl_ctrl", "whiten_rewards", "whiten_advantages",
                     "target_use_chat_template", "gradient_checkpointing", "share_frozen_weights"):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            fail("seed", f"must be an integer, got {self.seed!r}")
        if not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool):
            fail("max_steps", f"must be an integer (<= 0: use total_episodes), got {self.max_steps!r}")
        if self.reward_label_index is not None and (isinstance(self.reward_label_index, bool)
                                                    or not isinstance(self.reward_label_index, int)
                                                    or self.reward_label_index < 0):
            fail("reward_label_index", f"must be a non-negative integer, got {self.reward_label_index!r}")
        for name in ("warmup_steps", "num_logged_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                fail(name, f"must be a non-negative integer, got {v!r}")
        for name in ("save_total_limit", "eval_steps", "total_episodes", "max_prompt_length", "malloc_mmap_threshold"):
            if getattr(self, name) is not None:
                positive_int(name)
        if self.stop_token_id is not None and (not isinstance(self.stop_token_id, int) or self.stop_token_id < 0):
            fail("stop_token_id", f"must be a non-negative token id, got {self.stop_token_id!r}")

        if self.device is not None:
            if not isinstance(self.device, str):
                fail("device", f"must be a device name such as 'cpu' or 'cuda:0', got {self.device!r}")
            _checks.device("device", self.device, require_available=False)
        number("learning_rate", lo=0, lo_open=True)
        number("weight_decay", lo=0)
        number("adam_beta1", lo=0, hi=1)
        number("adam_beta2", lo=0, hi=1)
        number("adam_epsilon", lo=0, lo_open=True)
        number("max_grad_norm", lo=0, lo_open=True, allow_none=True)
        number("warmup_ratio", lo=0, hi=1)
        number("num_train_epochs", lo=0, lo_open=True)
        number("kl_coef", lo=0)
        number("kl_target", lo=0, lo_open=True)
        number("cliprange", lo=0, lo_open=True)
        number("cliprange_value", lo=0, lo_open=True)
        number("vf_coef", lo=0)
        number("entropy_coef", lo=0)
        number("gamma", lo=0, hi=1)
        number("lam", lo=0, hi=1)
        number("temperature", lo=0, lo_open=True)
        number("top_p", lo=0, hi=1, lo_open=True)
        number("target_temperature", lo=0)
        number("target_top_p", lo=0, hi=1, lo_open=True)
        number("missing_eos_penalty", lo=0, allow_none=True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", f"must be a non-negative integer (0: off), got {self.top_k!r}")

        if not isinstance(self.rewrite_template, str) or "{prompt}" not in self.rewrite_template:
            fail("rewrite_template", f"must be a string containing '{{prompt}}', got {self.rewrite_template!r}")
        if not isinstance(self.target_prompt_template, str) or "{rewrite}" not in self.target_prompt_template:
            fail("target_prompt_template",
                 f"must be a string containing '{{rewrite}}', got {self.target_prompt_template!r}")
        optional_text("target_system_prompt", self.target_system_prompt)
        if not isinstance(self.reward_template, str) or "{completion}" not in self.reward_template:
            fail("reward_template", f"must be a string containing '{{completion}}', got {self.reward_template!r}")
        from alignfast.rollout.templates import warn_unknown_fields

        warn_unknown_fields("rewrite_template", self.rewrite_template, ["prompt"])
        warn_unknown_fields("target_prompt_template", self.target_prompt_template, ["rewrite", "prompt"])
        warn_unknown_fields("reward_template", self.reward_template, ["prompt", "completion"])

        if self.reward_weights is not None:
            if not isinstance(self.reward_weights, (list, tuple)) or not self.reward_weights:
                fail("reward_weights", f"must be a non-empty list of numbers, got {self.reward_weights!r}")
            for w in self.reward_weights:
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                    fail("reward_weights", f"must hold finite numbers, got {w!r}")
            self.reward_weights = [float(w) for w in self.reward_weights]

        if self.batch_size is not None:
            positive_int("batch_size")
            if self.batch_size % self.mini_batch_size != 0:
                fail("batch_size", f"({self.batch_size}) must be a multiple of per_device_train_batch_size * "
                     f"gradient_accumulation_steps = {self.per_device_train_batch_size} * "
                     f"{self.gradient_accumulation_steps} = {self.mini_batch_size}")
            derived = self.batch_size // self.mini_batch_size
            if self.num_mini_batches not in (1, derived):
                fail("num_mini_batches", f"({self.num_mini_batches}) contradicts batch_size: {self.batch_size} / "
                     f"{self.mini_batch_size} = {derived} mini-batches")
            self.num_mini_batches = derived
        if self.total_episodes is not None and self.max_steps <= 0 and self.total_episodes < self.rollout_batch_size:
            fail("total_episodes", f"({self.total_episodes}) is smaller than one PPO batch ({self.rollout_batch_size})")
        if self.reuse_sampler_logprobs is not None and not isinstance(self.reuse_sampler_logprobs, bool):
            fail("reuse_sampler_logprobs", f"must be true, false or null, got {self.reuse_sampler_logprobs!r}")
        if not isinstance(self.torch_compile, bool):
            fail("torch_compile", f"must be true or false, got {self.torch_compile!r}")
        if self.torch_compile and self.backend != "fast":
            fail("torch_compile", "applies to backend 'fast' only (the reference backend is the plain-PyTorch spec)")


def coerce_config(config) -> AlignProConfig:
    """An AlignProConfig from a config or a plain dict; anything else is an error naming 'config'."""
    if isinstance(config, dict):
        return AlignProConfig.from_dict(config)
    if not isinstance(config, AlignProConfig):
        fail("config", f"must be an AlignProConfig or a dict, got "
             f"{type(config).__name__}")
    return config
