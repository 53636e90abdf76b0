"""AlignerTrainer: supervised fine-tuning of a corrector on {question, answer, correction} (Aligner,
Ji et al. 2024, arXiv 2402.02416).

The corrector pi_phi learns the correction residual: given the question x and an upstream answer y0,
write the better answer y*:

    min_phi  E[(x, y0, y*) ~ D]  - (1/|y*|+1) sum_t log pi_phi(y*_t | template(x, y0), y*_<t)   (+ EOS)

taken as one token mean over each optimizer step's rows (alignfast.aligner.loss). identity_ratio adds
identity rows y* = y0 (leave a good answer as it is); identity_schedule says when they are trained: "warmup"
(the paper's identity warm-up) gives them the run's first steps, each row at least once (the last step is
filled by repeating them), before the correction rows alone; "mixed" shuffles them in with the correction
rows through the whole run. The loop is the plain SFT loop; its machinery is the PPO trainers': AdamW, a
transformers LR schedule, the seeded data order (trainer.data.batch_indices; AlignerTrainer.step_rows),
callbacks (progress bar), metrics.jsonl (MetricsLogger) and atomic checkpoints with exact resume (trainer.checkpoint).
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import logging
import math
import time
from array import array
from pathlib import Path

import torch

from alignfast.aligner.config import AlignerConfig, coerce_config
from alignfast.aligner.data import (ENCODING_VERSIONS, PIECES_APART, CorrectionEncoder, check_rows, collate,
                                    with_identity_rows)
from alignfast.aligner.loss import CorrectionLoss, CorrectionNLL
from alignfast.files import readable_weights
from alignfast.ops import weight_grad_buffer
from alignfast.ops._checks import AlignfastArgumentError, fail
from alignfast.rollout.context import check_vocabulary, max_positions
from alignfast.trainer import checkpoint as ckpt
from alignfast.trainer.base import _changed_settings, load_causal_lm, load_tokenizer
from alignfast.trainer.callbacks import CallbackHandler
from alignfast.trainer.data import batch_indices
from alignfast.trainer.distributed import make_processes
from alignfast.trainer.metrics_logger import check_reporters
from alignfast.trainer.optimizers import no_weight_decay, own_hyperparameters, regrouped_state
from alignfast.trainer.ppo_core import bounded_param_groups
from alignfast.trainer.resume_checks import (CheckpointMismatchError, check_num_steps, check_resume_matches,
                                             check_same_arm, check_same_reference, follow_schedule,
                                             reference_fingerprint, warn_other_train_rows)
from alignfast.trainer.results import TrainingDivergedError
from alignfast.trainer.run_loop import RunLoop

_log = logging.getLogger("alignfast.aligner")

ALIGNER_FILE = "aligner_config.json"  # beside a saved corrector: how to build its input


def _param_groups(model, params: list, weight_decay: float) -> list[dict]:
    """AdamW's groups with weight decay as transformers' Trainer applies it (weight_decay is a TrainingArguments
    name and means what it means there): biases and norm weights get none (trainer.optimizers.no_weight_decay,
    the PPO trainers' rule). The parameters keep their order; without weight decay they stay one group, as
    before, so earlier checkpoints resume."""
    if not weight_decay:
        return [{"params": params}]
    return bounded_param_groups(params, max_numel=sum(p.numel() for p in params), no_decay=no_weight_decay([model]))


class AlignerTrainer(RunLoop):
    """SFT of a causal-LM corrector. `model`: a transformers causal LM or a path; train_dataset /
    eval_dataset: rows {question, answer, correction} (a list, or a datasets.Dataset)."""

    arm = "aligner"

    def __init__(self, config: AlignerConfig | dict, model, tokenizer=None, *, train_dataset, eval_dataset=None,
                 peft_config=None, callbacks=None):
        config = coerce_config(config)
        check_reporters(config.report_to)
        self.config = config
        self.processes = make_processes(config)  # an Accelerator under accelerate launch / torchrun; none otherwise
        if self.processes.sharded_state:
            raise AlignfastArgumentError(
                "alignfast: the Aligner trains a replicated corrector (DDP); FSDP / DeepSpeed sharding is not "
                "supported for it: launch with configs/accelerate/ddp.yaml (or torchrun) instead")
        from transformers import get_scheduler, set_seed

        set_seed(config.seed)
        self.tokenizer = load_tokenizer(tokenizer, model, "tokenizer")  # from the model's path when not given
        model = load_causal_lm(model, "model")
        check_vocabulary(model, self.tokenizer, "tokenizer", "corrector", "aligner.tokenizer")
        positions = max_positions(model)
        if positions is not None and config.max_length > positions:
            # max_length is a cap (default 2048): rows up to the corrector's context are fine, so the cap becomes the
            # context, and the rows beyond it are counted in the truncation warning below, not fed past it.
            _log.warning("max_length=%d is beyond the corrector's max_position_embeddings (%d): rows are cut to %d "
                         "tokens", config.max_length, positions, positions)
            config = dataclasses.replace(config, max_length=positions)
            self.config = config
        if config.device is not None:
            model = model.to(config.device)
        if self.processes.distributed:  # the launcher's device for this process (cuda:LOCAL_RANK, or cpu)
            model = model.to(self.processes.accelerator.device)
        if peft_config is not None:
            from alignfast.trainer.policy import with_lora

            model = with_lora(model, peft_config, "aligner.lora")
        self.model = model
        self.device = next(model.parameters()).device
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self.encoder = CorrectionEncoder(self.tokenizer, config.template_text,
                                         use_chat_template=config.use_chat_template, max_length=config.max_length)

        rows = check_rows(train_dataset, name="train_dataset")
        self.train_rows = with_identity_rows(rows, config.identity_ratio, config.seed)
        self.eval_rows = check_rows(eval_dataset, name="eval_dataset") if eval_dataset is not None else None
        self.data_stats = {"rows": len(self.train_rows), "identity_rows": len(self.train_rows) - len(rows)}
        self._train_fingerprint: str | None = None
        self._encode_rows()
        if self.data_stats["truncated_rows"]:
            _log.warning("%d of %d training rows exceed max_length=%d: their answers (and if needed the ends of "
                         "their corrections) were cut", self.data_stats["truncated_rows"], len(self.train_encoded),
                         config.max_length)

        if config.backend == "fast":
            from alignfast.ops import cpu_gemm

            cpu_gemm.current()  # a bad ALIGNFAST_CPU_GEMM is reported now, in one line, not at the first step
        self.loss_fn = CorrectionLoss(model, backend=config.backend)
        # One process on the CPU: the fused op writes the LM head's dW into one kept block (ops/weight_grad_buffer.py).
        self.head_grad_buffer = (weight_grad_buffer.register_if_worth(self.loss_fn.head.weight, owner=self)
                                 if self.loss_fn.head is not None and not self.processes.distributed else None)
        identity = self.data_stats["identity_rows"]
        self.identity_steps = config.identity_steps(identity)
        self.num_steps = config.num_steps(len(self.train_encoded), identity)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise AlignfastArgumentError("alignfast: the corrector has no trainable parameter")
        self.optimizer = torch.optim.AdamW(_param_groups(model, self.params, config.weight_decay),
                                           lr=config.learning_rate,
                                           betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                                           weight_decay=config.weight_decay, foreach=True)
        warmup = config.warmup_steps or math.ceil(config.warmup_ratio * self.num_steps)
        self.lr_scheduler = get_scheduler(config.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                                          num_training_steps=self.num_steps)
        # Under a launcher: the corrector with its loss as one module, as accelerate wrapped it (DDP's hooks must
        # see the forward that produces the loss).
        self.wrapped = None
        if self.processes.distributed:
            self.wrapped, self.optimizer = self.processes.accelerator.prepare(
                CorrectionNLL(self.model, self.loss_fn), self.optimizer)
        self.callbacks = CallbackHandler(callbacks, config)
        self.global_step = 0
        self.num_tokens = 0
        self.history: list[dict] = []

    def _encode_rows(self) -> None:
        """The training and eval rows as token ids by self.encoder (again after a resume changed its encoding)."""
        self.train_encoded = [self.encoder.encode(r, index=i) for i, r in enumerate(self.train_rows)]
        self.eval_encoded = ([self.encoder.encode(r, index=i) for i, r in enumerate(self.eval_rows)]
                             if self.eval_rows is not None else None)
        self.data_stats["truncated_rows"] = sum(1 for e in self.train_encoded
                                                if e.answer_tokens_dropped or e.correction_tokens_dropped)
        self._train_fingerprint = None

    # ------------------------------------------------------------------------------------------
    # hooks of the shared run loop (alignfast.trainer.run_loop: train(), resume, checkpoints, stop signals)
    def _eval_due(self, final: bool) -> bool:
        return final and self.eval_encoded is not None  # eval/loss once, at the end of the run

    def _epoch(self, metrics: dict) -> float:
        return metrics["epoch"]

    def _log_line(self, metrics: dict) -> str:
        return f"loss {metrics['loss']:.4f}  grad_norm {metrics['grad_norm']:.3f}  lr {metrics['learning_rate']:.2e}"

    def step_rows(self, step: int) -> list[int]:
        """Indices into train_rows of step `step` (0-based): a pure function of (seed, step, the rows), so a resume
        at any step takes the rows an uninterrupted run would. train_rows holds the correction rows, then the identity
        rows. Mixed (or no identity rows): batch_indices over them all. Warm-up: steps < identity_steps take
        batch_indices over the identity rows, the later ones batch_indices over the correction rows, counted from
        the end of the warm-up."""
        cfg = self.config
        identity = self.data_stats["identity_rows"]
        if not self.identity_steps:
            return batch_indices(len(self.train_rows), cfg.rows_per_step, step, cfg.seed)
        corrections = len(self.train_rows) - identity
        if step < self.identity_steps:
            return [corrections + i for i in batch_indices(identity, cfg.rows_per_step, step, cfg.seed)]
        return batch_indices(corrections, cfg.rows_per_step, step - self.identity_steps, cfg.seed)

    def _train_step(self, step: int, last_good) -> tuple[dict, list]:
        """One optimizer step over rows_per_step rows: G micro-batches, each loss the micro-batch's NLL sum over
        the step's token count (an exact token mean over the step). Under N processes process r runs micro-batches
        [r·G/N, (r+1)·G/N) with its losses scaled by N, so DDP's mean of the gradients is the one-process gradient:
        (1/N) Σ_r Σ_{k∈r} N·nll_k/n = ∇ Σ_k nll_k/n."""
        cfg = self.config
        procs = self.processes
        t0 = time.perf_counter()
        rows = [self.train_encoded[i] for i in self.step_rows(step)]
        micro = [rows[i: i + cfg.per_device_train_batch_size]
                 for i in range(0, len(rows), cfg.per_device_train_batch_size)]
        n_tokens = sum(len(r.target_ids) for r in rows)  # collate's response mask: the targets and their EOS
        mine = procs.micro_batches(len(micro)) if procs.distributed else range(len(micro))
        batches = [collate(micro[k], self.pad_id, self.device) for k in mine]
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for j, b in enumerate(batches):
            with procs.no_sync(self.wrapped, last=j == len(batches) - 1):
                loss = (self.wrapped(b) if self.wrapped is not None else self.loss_fn.nll_sum(b)) / n_tokens
                if not procs.distributed and not torch.isfinite(loss):
                    raise self._diverged(step, last_good)
                if procs.distributed:
                    procs.accelerator.backward(loss * procs.num_processes * procs.backward_scale)
                else:
                    loss.backward()
            total += float(loss.detach())
        total = procs.sum(total)  # every process's share: the step's token-mean loss
        if not math.isfinite(total):  # under N processes every process sees it here, before the update
            raise self._diverged(step, last_good)
        if cfg.max_grad_norm is not None:
            grad_norm = float(procs.accelerator.clip_grad_norm_(self.wrapped.parameters(), cfg.max_grad_norm)
                              if procs.distributed else torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack(
                [p.grad.detach().float().norm() for p in self.params if p.grad is not None])))
        lr = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.model.eval()
        self.num_tokens += n_tokens
        dt = time.perf_counter() - t0
        return {"loss": total, "grad_norm": grad_norm, "learning_rate": lr,
                "epoch": (step + 1) * cfg.rows_per_step / len(self.train_encoded), "num_tokens": self.num_tokens,
                "timing_s/step": dt, "tokens/s": n_tokens / dt if dt > 0 else 0.0}, []

    @staticmethod
    def _diverged(step: int, last_good) -> TrainingDivergedError:
        return TrainingDivergedError(
            f"alignfast: non-finite loss at step {step + 1}. Training stopped before this step's update; the last "
            f"good checkpoint is {last_good or 'none (no checkpoint yet)'}", step=step + 1, checkpoint=last_good)

    @torch.no_grad()
    def evaluate(self, eval_dataset=None) -> dict[str, float]:
        """eval/loss: the token-mean correction NLL over the eval rows (no truncation beyond max_length)."""
        if eval_dataset is not None:
            rows = check_rows(eval_dataset, name="eval_dataset")
            encoded = [self.encoder.encode(r, index=i) for i, r in enumerate(rows)]
        elif self.eval_encoded is not None:
            encoded = self.eval_encoded
        else:
            fail("eval_dataset", "is required (none was given to the trainer)")
        procs = self.processes
        encoded = encoded[procs.index::procs.num_processes]  # every N-th row: each process its share, summed below
        bs = self.config.per_device_eval_batch_size
        total, count = 0.0, 0
        for i in range(0, len(encoded), bs):
            b = collate(encoded[i: i + bs], self.pad_id, self.device)
            total += float(self.loss_fn.nll_sum(b))
            count += b.num_tokens
        return {"eval/loss": procs.sum(total) / max(1, procs.sum(count))}

    def corrector(self, *, max_new_tokens: int = 256):
        """The trained corrector as an alignfast.aligner.Corrector (greedy, batched)."""
        from alignfast.aligner.pipeline import Corrector

        return Corrector(self.model, self.tokenizer, template=self.config.template_text,
                         use_chat_template=self.config.use_chat_template, max_length=self.config.max_length,
                         max_new_tokens=max_new_tokens, batch_size=self.config.per_device_eval_batch_size,
                         encoding_version=self.encoder.encoding_version)

    def save_model(self, output_dir=None) -> Path:
        """The corrector (or its LoRA adapter), its tokenizer, and aligner_config.json (template, chat
        template flag, max_length, encoding_version) so AlignerPipeline / `alignfast correct` rebuild its input
        exactly; in `output_dir` (by default the run's output_dir/final), written whole or not at all:
        RunLoop._save_model_folder."""
        return self._save_model_folder(output_dir, "the corrector", lambda: self._save_policy)

    def _save_policy(self, path: Path) -> None:
        self.model.save_pretrained(str(path))
        readable_weights(path)  # safetensors writes 0600
        self.tokenizer.save_pretrained(str(path))
        ckpt.absolute_adapter_base(path)  # a base given as a relative folder loads from any working directory
        cfg = self.config
        (Path(path) / ALIGNER_FILE).write_text(json.dumps(
            {"template": cfg.template_text, "use_chat_template": cfg.use_chat_template, "max_length": cfg.max_length,
             "encoding_version": self.encoder.encoding_version}, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------
    # checkpoints (the PPO trainers' atomic format)
    # ------------------------------------------------------------------------------------------
    def _save_checkpoint(self) -> Path:
        cfg = self.config
        trainable = {"policy": {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}}
        state = {"global_step": self.global_step, "num_tokens": self.num_tokens, "history": self.history,
                 "config": cfg.to_dict(), "arm": self.arm, "num_steps": self.num_steps,
                 "num_processes": self.processes.num_processes, "reference_fingerprint": self._base_fingerprint(),
                 "train_rows": len(self.train_encoded), "train_fingerprint": self._data_fingerprint(),
                 "encoding_version": self.encoder.encoding_version}
        path = Path(cfg.output_dir) / f"checkpoint-{self.global_step}"
        if self.processes.is_main:  # the replicas are identical: one process writes
            path = ckpt.save_checkpoint(cfg.output_dir, self.global_step, trainable=trainable,
                                        optimizer=self.optimizer, scheduler=self.lr_scheduler, trainer_state=state,
                                        save_policy=self._save_policy, total_limit=cfg.save_total_limit)
        self.processes.wait()  # no process runs ahead of (or resumes from) a half-written checkpoint
        return path

    def _base_fingerprint(self) -> str:
        """Identity of the frozen weights (a LoRA run's base model; nothing when every weight trains, as the
        checkpoint then holds them all)."""
        return reference_fingerprint((n, p) for n, p in self.model.named_parameters() if not p.requires_grad)

    def _data_fingerprint(self) -> str:
        """Identity of the encoded training rows (their order included): the data order depends on them."""
        if self._train_fingerprint is None:
            h = hashlib.sha256()
            for r in self.train_encoded:
                h.update(array("q", [len(r.prompt_ids), *r.prompt_ids, *r.target_ids]).tobytes())
            self._train_fingerprint = h.hexdigest()[:16]
        return self._train_fingerprint

    def _use_checkpoint_encoding(self, path: Path, state: dict) -> None:
        """The run goes on tokenizing its rows as the checkpoint's run did (a checkpoint without encoding_version
        was written by the pieces-apart encoding): the corrector is trained on one encoding, and its
        aligner_config.json names the one it will be fed at inference."""
        saved = state.get("encoding_version", PIECES_APART)
        if saved == self.encoder.encoding_version:
            return
        if saved not in ENCODING_VERSIONS:
            raise CheckpointMismatchError(
                f"alignfast: cannot resume from {path}: its rows were tokenized by encoding_version {saved!r}, which "
                "this alignfast does not know (written by a newer one?); resume with that alignfast, or start a new "
                "run in another output_dir")
        _log.warning("resuming from %s, whose run tokenized its rows by encoding_version %d (%s): the run goes on "
                     "with it, and the saved corrector records it", path, saved,
                     "the pieces apart, as alignfast did before the one-text encoding" if saved == PIECES_APART
                     else "the one-text encoding")
        e = self.encoder
        self.encoder = CorrectionEncoder(e.tokenizer, e.template, use_chat_template=e.use_chat_template,
                                         max_length=e.max_length, encoding_version=saved)
        self._encode_rows()

    def _load_checkpoint(self, path: Path) -> None:
        data = ckpt.load_checkpoint(path, map_location=self.device)
        state = data["state"]
        # Before any tensor is copied: the corrector's trainable set and shapes (with/without LoRA, other
        # target_modules or rank), then a LoRA run's frozen base weights (another base model of the same shapes).
        check_same_arm(path, state, self.arm)
        rebuilt = check_num_steps(path, state, self.num_steps, self.config.lr_scheduler_type)
        check_resume_matches(path, data["trainable"], state, self.model, self.config, value_model=None,
                             value_head=None, label="corrector")
        check_same_reference(path, state, self._base_fingerprint(), self.arm,
                             weights="the corrector's frozen base weights (LoRA) differ from this run's")
        self._use_checkpoint_encoding(path, state)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in data["trainable"]["policy"].items():
                params[name].copy_(value)
        # Groups differ when weight decay was switched on or off, or the checkpoint is from before biases and norm
        # weights had a group of their own: the same parameters in the same order, fitted to this run's groups.
        optimizer, scheduler = regrouped_state(data["optimizer"], data["scheduler"], self.optimizer)
        with own_hyperparameters(self.optimizer):  # this run's weight_decay, betas and eps
            self.optimizer.load_state_dict(optimizer)
        self.lr_scheduler.load_state_dict(scheduler)
        if rebuilt:
            follow_schedule(self.lr_scheduler)
        ckpt.set_rng_state(data["rng"])
        saved = dict(state.get("config") or {})
        if saved and "identity_schedule" not in saved:
            # written before the setting existed, when identity rows were always mixed in: compared as such, so that
            # resuming such a run (with identity rows) under the warm-up is said to differ
            saved["identity_schedule"] = "mixed"
        if not saved.get("identity_ratio") and not self.config.identity_ratio:
            saved["identity_schedule"] = self.config.identity_schedule  # no identity rows: the schedule is moot
        changed = _changed_settings(saved, json.loads(self.config.to_json()))
        if changed:
            _log.warning("resuming from %s with settings that differ from the checkpoint's (%s): the run will not "
                         "match an uninterrupted one", path, ", ".join(changed))
        warn_other_train_rows(path, state, len(self.train_encoded), self._data_fingerprint(), what="training rows",
                              setting="data.train in a run file; train_dataset in Python")
        self.global_step = int(state["global_step"])
        self.num_tokens = int(state["num_tokens"])
        self.history = list(state["history"])
