"""PPOEngineTrainer: the PPO engine shared by Align-Pro, the Oracle arm and Proxy-RLHF (its run loop,
trainer/run_loop.py, serves the Aligner's SFT too).

A subclass supplies the trained causal LM (the policy), its tokenizer and an Environment; this class
owns the rest: reference model, critic, optimizer, schedule, sampling, PPO steps, metrics,
checkpoints, resume, evaluation rollouts. One PPO step:

    prompts x  --policy_requests-->  policy input (chat template)  --sample-->  policy outputs
    --environment.step-->  scores  --(old, ref log-probs, values)-->  advantages  --PPO-->  update
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from alignfast.files import readable_weights, write_text_atomically
from alignfast.ops import _checks, cpu_gemm, weight_grad_buffer
from alignfast.ops._checks import AlignfastArgumentError, fail
from alignfast.rollout import templates
from alignfast.rollout.rewards import RewardModel, WeightedRewards, check_weights
from alignfast.trainer import checkpoint as ckpt
from alignfast.trainer import allocator, frozen
from alignfast.trainer.callbacks import CallbackHandler
from alignfast.trainer.compiled_layers import attach_compiled_layers
from alignfast.trainer.config import AlignProConfig, coerce_config
from alignfast.rollout.context import CutCounter, policy_input_limit
from alignfast.trainer.data import PromptBatch, PromptDataset, batch_indices, derive_seed
from alignfast.trainer.distributed import (NoState as _NoState, TrainableModules, check_resumable,
                                           gather_env_output, gather_rollout, gathered_for_generation,
                                           gathered_policy_state, make_processes, save_sharded_state)
from alignfast.trainer.embedding_grad import install_for_critic, install_for_policy
from alignfast.trainer.env_checks import check_env_output, check_requests
from alignfast.trainer.environments import Environment
from alignfast.trainer.kl_controller import make_kl_controller
from alignfast.trainer.lora_fast import install_lean_lora
from alignfast.trainer.metrics_logger import check_reporters
from alignfast.trainer.policy import (CausalLMPolicy, ValueModel, enable_activation_checkpointing, is_peft_model,
                                     value_head_for, with_lora)
from alignfast.trainer.optimizers import make_optimizer, no_weight_decay, own_hyperparameters, regrouped_state
from alignfast.trainer.ppo_core import (NonFiniteLoss, PPOUpdater, Rollout, compute_advantages, make_opset,
                                        score_rollout)
from alignfast.trainer.results import RolloutResult, TrainingDivergedError
from alignfast.trainer.resume_checks import (check_num_steps, check_resume_matches, check_same_arm,
                                             check_same_reference, EMPTY_FINGERPRINT, prompts_fingerprint,
                                             follow_schedule, reference_fingerprint, warn_other_inputs,
                                             warn_other_train_rows)
from alignfast.trainer.sampling import SampledBatch, left_pad, sample
from alignfast.trainer.run_loop import RunLoop

_log = logging.getLogger("alignfast.trainer")


def load_causal_lm(model_or_path, name: str):
    if isinstance(model_or_path, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(model_or_path))
    if not isinstance(model_or_path, torch.nn.Module):
        fail(name, f"must be a transformers causal LM or a path, got "
             f"{type(model_or_path).__name__}")
    return model_or_path


def load_tokenizer(tokenizer, model_or_path, name: str):
    if tokenizer is not None:
        return tokenizer
    if isinstance(model_or_path, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_or_path))
    fail(name, "is required when the model is passed as an object")


def build_rewards(config: AlignProConfig, *, reward_model, reward_tokenizer, reward_funcs, reward_weights,
                  device) -> WeightedRewards:
    """[reward model (if any), *reward_funcs] with weights from the argument or config.reward_weights."""
    funcs = []
    if reward_model is not None:
        if isinstance(reward_model, RewardModel):
            funcs.append(reward_model)
        else:
            funcs.append(RewardModel(reward_model, reward_tokenizer, template=config.reward_template,
                                     batch_size=config.reward_batch_size, label_index=config.reward_label_index,
                                     device=device if isinstance(reward_model, (str, os.PathLike)) else None))
    if reward_funcs is not None:
        funcs.extend(reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs])
    if reward_weights is not None:
        reward_weights = check_weights(reward_weights)
    if reward_weights is not None and config.reward_weights is not None and reward_weights != config.reward_weights:
        fail("reward_weights", "differs from config.reward_weights; give one")
    weights = reward_weights if reward_weights is not None else config.reward_weights
    return WeightedRewards(funcs, weights)


# Beside a saved model: {"arm": "align_pro" | "oracle" | "proxy" | ...}, the trainer that wrote it, with the class of
# its environment and what the environment's describe() says ("environment", "environment_settings").
ARM_FILE = "alignfast_arm.json"


class PPOEngineTrainer(RunLoop):
    """The shared PPO engine. Subclasses call `_setup(...)` from their constructor."""

    arm = "ppo"
    # The chat's system message in the policy's own input: none for a prompter; the Oracle's policy is the target,
    # which answers after config.target_system_prompt as the frozen target does under Align-Pro.
    policy_system_prompt: str | None = None
    policy_role = "policy"  # what errors and warnings about the policy's context call it
    policy_cut_note = "their start is lost: set trainer.max_prompt_length, or shorten the prompts"

    def _setup(self, config, policy_model, policy_tokenizer, environment: Environment, *, train_dataset,
               eval_dataset=None, ref_model=None, value_model=None, peft_config=None, callbacks=None):
        config = coerce_config(config)
        check_reporters(config.report_to)
        self.config = config
        self.environment = environment
        self.processes = make_processes(config)  # one process without a launcher: no Accelerator
        self.ops = make_opset(config.backend)
        self.train_dataset = PromptDataset(train_dataset, name="train_dataset")
        self.eval_dataset = PromptDataset(eval_dataset, name="eval_dataset") if eval_dataset is not None else None
        if config.eval_steps and self.eval_dataset is None:  # would be silently skipped at every step (HF fails too)
            fail("eval_steps", f"is {config.eval_steps} but there is no eval_dataset to evaluate on: pass one "
                 "(`data.eval` in a run file) or leave eval_steps unset")
        self.num_steps = config.num_steps(len(self.train_dataset))
        if config.malloc_mmap_threshold is not None:  # before the reference and critic copies are made
            allocator.set_mmap_threshold(config.malloc_mmap_threshold)
        from transformers import set_seed

        set_seed(config.seed)

        model = policy_model
        if self.processes.distributed:  # the launcher's device for this process (cuda:LOCAL_RANK, or cpu)
            model = model.to(self.processes.accelerator.device)
        elif config.device is not None:
            model = model.to(_checks.device("device", config.device))
        self.device = next(model.parameters()).device
        self.tokenizer = policy_tokenizer
        self.pad_id, self.stop_ids = _special_ids(policy_tokenizer, model, config.stop_token_id)
        self._cut_policy_inputs = CutCounter(f"{self.policy_role}'s inputs", policy_input_limit(model, config,
                                             self.policy_role), self.policy_cut_note)

        # The critic copies the backbone before any LoRA adapter is injected into it.
        self.value_model = None
        shared_head = None
        if value_model is not None:
            self.value_model = value_model if isinstance(value_model, ValueModel) else \
                ValueModel.from_sequence_classifier(value_model)
        elif config.value_head == "separate":
            self.value_model = ValueModel.from_causal_lm(model)
        else:
            shared_head = value_head_for(model)
        if self.value_model is not None:
            self.value_model.to(self.device).eval()
            self.value_model.requires_grad_(True)

        if peft_config is not None:
            model = with_lora(model, peft_config, f"{self.policy_role}.lora")
        self.ref_model = None
        self.shared_frozen = None  # what is held once for the reference and the target (frozen.py)
        frozen_dtype = getattr(torch, config.frozen_dtype) if config.frozen_dtype is not None else None
        if frozen_dtype is not None and ref_model is None and is_peft_model(model):
            fail("frozen_dtype", "applies to full fine-tuning only: with LoRA the reference is the policy's own "
                 "frozen base (adapter disabled); set the target's dtype where the target is loaded (target.dtype)")
        target = frozen.target_module(environment) if config.share_frozen_weights else None
        if ref_model is not None:
            self.ref_model = load_causal_lm(ref_model, "ref_model").to(self.device)
            frozen.cast_parameters(self.ref_model, frozen_dtype)
        elif not is_peft_model(model):
            if target is not None and frozen.same_function(model, target, frozen_dtype or self._dtype(model)):
                self.ref_model, self.shared_frozen = target, "reference = target"
            else:
                self.ref_model = frozen.reference_copy(model, frozen_dtype)
        elif target is not None and frozen.share_frozen_base(model, target):
            self.shared_frozen = "policy's frozen base = target"
        if self.shared_frozen:
            _log.info("holding the frozen weights once: %s (the same weights, bit for bit)", self.shared_frozen)
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
        # Dropout off everywhere (as TRL does): the log-probs of the rollout and the update must agree.
        model.eval()
        self.model = model
        # Fast backend: PEFT's LoRA math without its per-call Python (bit for bit; trainer/lora_fast.py).
        self.lean_lora_layers = install_lean_lora(model) if config.backend == "fast" and is_peft_model(model) else 0
        self.policy = CausalLMPolicy(model, backend=config.backend, value_head=shared_head)
        self.shared_value_head = shared_head
        if config.gradient_checkpointing:
            self.policy.checkpointed = enable_activation_checkpointing(model)
            if self.value_model is not None:
                self.value_model.checkpointed = enable_activation_checkpointing(self.value_model.backbone)
        self._ref_policy = CausalLMPolicy(self.ref_model if self.ref_model is not None else model,
                                          backend=config.backend)
        # The reference policy's GEMMs as the policy's: while the two are equal (step 1) their log-probs, and so the
        # KL, agree bit for bit. A checkpointed policy keeps ATen's GEMMs (policy.fast_gemms_on); so does it.
        self._ref_policy.route_gemms = self.policy.route_gemms and not self.policy.checkpointed
        if config.backend == "fast":
            cpu_gemm.current()  # a bad ALIGNFAST_CPU_GEMM is reported now, in one line, not mid-run
        if self.value_model is not None:  # the critic's GEMMs as the policy's (policy.fast_gemms_on)
            self.value_model.route_gemms = config.backend == "fast"
        if config.torch_compile:  # regional compilation of the decoder layers (trainer/compiled_layers.py)
            attach_compiled_layers(self.device, self.policy, self._ref_policy, self.value_model)
        # Fast backend, one process, CPU: the critic's token-embedding gradient lives in a persistent buffer
        # (exact; no 113 MB zero-fill and page faults per micro-batch at SmolLM2's shape: embedding_grad.py).
        # A trained policy's own embeddings likewise; tied to its LM head, their rows go into its gradient in place.
        # The fused log-prob op writes the LM head's dW into one kept block (exact; ops/weight_grad_buffer.py).
        self.embedding_grad_buffers, self.policy_embedding_grad, self.head_grad_buffer = 0, None, None
        if config.backend == "fast" and not self.processes.distributed:
            if self.policy.fused:
                self.head_grad_buffer = weight_grad_buffer.register_if_worth(self.policy.head.weight, owner=self)
            if self.value_model is not None:
                self.embedding_grad_buffers = install_for_critic(self.value_model, list(model.parameters()))
            self.policy_embedding_grad = install_for_policy(
                model, micro_batches_per_step=config.gradient_accumulation_steps)

        self.params = [p for p in model.parameters() if p.requires_grad]
        if shared_head is not None:
            self.params += list(shared_head.parameters())
        if self.value_model is not None:
            self.params += [p for p in self.value_model.parameters() if p.requires_grad]
        self.no_decay = no_weight_decay([model, shared_head, self.value_model])
        self._setup_optimization(callbacks)

    @staticmethod
    def _dtype(model) -> torch.dtype:
        return next(p.dtype for p in model.parameters() if p.is_floating_point())

    def _setup_optimization(self, callbacks=None) -> None:
        """Optimizer over self.params, LR schedule, KL controller, PPO updater, callbacks and counters: the part
        of the setup every trainer shares (ProxyRLHFTrainer, whose policy is not a causal LM, calls it directly)."""
        config = self.config
        if not self.params:
            raise AlignfastArgumentError("alignfast: the policy has no trainable parameter")
        # config.optim: exact AdamW or torchao's 8/4-bit; biases and norm weights without weight decay, as TRL's
        self.optimizer = make_optimizer(self.params, config, no_decay=getattr(self, "no_decay", None))
        from transformers import get_scheduler

        warmup = config.warmup_steps or math.ceil(config.warmup_ratio * self.num_steps)
        self.lr_scheduler = get_scheduler(config.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                                          num_training_steps=self.num_steps)
        self.kl_ctl = make_kl_controller(config)
        self.trainable = None  # under a launcher: the policy (+ value head / critic) as accelerate wrapped it
        if self.processes.distributed:
            modules = TrainableModules(self.model, self.policy, self.value_model, self.shared_value_head)
            self.trainable, self.optimizer = self.processes.accelerator.prepare(modules, self.optimizer)
        self.updater = PPOUpdater(self.policy, self.value_model, self.optimizer, self.params, self.ops, config,
                                  processes=self.processes, forward_module=self.trainable)
        self.callbacks = CallbackHandler(callbacks, config)
        self.global_step = 0
        self.episode = 0
        self.history: list[dict] = []
        self.last_rollout: Rollout | None = None  # the last PPO batch (tests and debugging read it)
        self.last_update_losses: list[float] = []

    # ------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------
    # hooks of the shared run loop (trainer/run_loop.py: train(), the output-directory rule)
    def _eval_due(self, final: bool) -> bool:
        cfg = self.config
        return self.eval_dataset is not None and bool(cfg.eval_steps) and (self.global_step % cfg.eval_steps == 0
                                                                            or final)

    def _epoch(self, metrics: dict) -> float:
        return self.episode / len(self.train_dataset)

    def _log_line(self, metrics: dict) -> str:
        return (f"scores {metrics['objective/scores']:.4f}  kl {metrics['objective/kl']:.4f}  policy loss "
                f"{metrics['loss/policy_avg']:.4f}  value loss {metrics['loss/value_avg']:.4f}")

    def rollout(self, prompts: Sequence[str], *, greedy: bool = True, seed: int | None = None,
                columns: dict[str, list] | None = None) -> RolloutResult:
        """Run prompts through this arm without training: policy output (greedy or sampled at the
        config's temperature), the environment's answers and the scores."""
        prompts = list(prompts)
        columns = {k: list(v) for k, v in (columns or {}).items()}
        for k, v in columns.items():
            if len(v) != len(prompts):
                fail("columns", f"entry '{k}' has {len(v)} values for {len(prompts)} prompts")
        seed = self.config.seed if seed is None else seed
        result = RolloutResult(prompts=[], rewrites=[], answers=[], scores=[], all_answers=[], reward_components={})
        bs, policy_seed = self._rollout_plan(seed)
        for chunk, start in enumerate(range(0, len(prompts), bs)):
            p = prompts[start: start + bs]
            cols = {k: v[start: start + bs] for k, v in columns.items()}
            outputs = self._rollout_outputs(p, cols, greedy=greedy, seed=policy_seed(chunk))
            env_out = self.environment.step(p, outputs, cols, seed=derive_seed(seed, chunk, stream=6) % (2**31))
            check_env_output(self.environment, env_out, p, first_episode=start)
            result.prompts += p
            result.rewrites += self._rewrites_for_result(p, outputs)
            result.answers += [a[0] if a else "" for a in env_out.answers]
            result.all_answers += env_out.answers
            result.scores += env_out.scores
            for name, values in env_out.per_func.items():
                result.reward_components.setdefault(name, []).extend(values)
        return result

    def _rollout_plan(self, seed: int):
        """(prompts per chunk, chunk index -> the policy's seed) of rollout()."""
        return self.config.per_device_eval_batch_size, lambda chunk: derive_seed(seed, chunk, stream=5)

    def evaluate(self, eval_dataset=None) -> dict[str, float]:
        """Greedy rollouts over the eval set: eval/scores (mean), eval/scores_std, eval/rewards/<name>."""
        data = PromptDataset(eval_dataset, name="eval_dataset") if eval_dataset is not None else self.eval_dataset
        if data is None:
            fail("eval_dataset", "is required (none was given to the trainer)")
        res = self.rollout(data.prompts, greedy=True, columns=data.columns)
        scores = torch.tensor(res.scores, dtype=torch.float64)
        out = {"eval/scores": float(scores.mean()),
               "eval/scores_std": float(scores.std()) if scores.numel() > 1 else 0.0}
        for name, values in res.reward_components.items():
            vals = [v for v in values if v is not None]
            if vals:
                out[f"eval/rewards/{name}"] = sum(vals) / len(vals)
        return out

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """The policy (or its LoRA adapter) and its tokenizer in save_pretrained form, in `output_dir` (by default
        the run's output_dir/final), written whole or not at all: RunLoop._save_model_folder."""
        def gathered():
            # Sharded state (FSDP2 / ZeRO-3): the full weights are gathered to the main process (collective).
            state = gathered_policy_state(self.processes, self.trainable) if self.processes.sharded_state else None
            extra = {"state_dict": state} if state is not None else {}
            return lambda folder: self._write_model(folder, extra)

        return self._save_model_folder(output_dir, "the model", gathered)

    def _write_model(self, folder: Path, extra: dict) -> None:
        """The model, its tokenizer, and which arm trained it (ARM_FILE: `alignfast eval` refuses a folder passed as
        another arm's checkpoint, which it used to score and label as that arm)."""
        self.model.save_pretrained(str(folder), **extra)
        readable_weights(folder)  # safetensors writes 0600
        self.tokenizer.save_pretrained(str(folder))
        ckpt.absolute_adapter_base(folder)
        write_text_atomically(Path(folder) / ARM_FILE, json.dumps({"arm": self.arm, **self._environment_record()})
                              + "\n")

    def _environment_record(self) -> dict:
        """{"environment": its class name, "environment_settings": its describe()} (the latter where it says):
        what `alignfast eval` rebuilds the policy's environment from and checks its settings against."""
        env = self.environment
        record = {"environment": type(env).__name__}
        describe = getattr(env, "describe", None)
        settings = describe() if callable(describe) else None
        if settings is not None:
            record["environment_settings"] = json.loads(json.dumps(settings, default=repr))
        return record

    # ------------------------------------------------------------------------------------------
    # hooks for subclasses
    # ------------------------------------------------------------------------------------------
    def _rollout_outputs(self, prompts: list[str], columns: dict, *, greedy: bool, seed: int) -> list[str]:
        """The policy's outputs for one chunk of `rollout()`'s prompts (a trainer whose policy does not write
        text itself, such as Proxy-RLHF's, overrides this)."""
        return self._decode(self._sample(prompts, columns, greedy=greedy, seed=seed))

    def _rewrites_for_result(self, prompts: list[str], outputs: list[str]) -> list[str]:
        return outputs

    # ------------------------------------------------------------------------------------------
    # one PPO step
    # ------------------------------------------------------------------------------------------
    def _train_step(self, step: int, last_good) -> tuple[dict, list[dict]]:
        cfg = self.config
        B = cfg.rollout_batch_size
        batch = self.train_dataset.select(batch_indices(len(self.train_dataset), B, step, cfg.seed))
        # Under N processes this one samples, answers and scores rows [lo, hi) of the global batch, with the
        # random draws those rows get in one process; everything after the gathers is global.
        procs = self.processes
        lo, hi = procs.rows(B)
        local = batch if not procs.distributed else \
            PromptBatch(batch.prompts[lo:hi], {k: v[lo:hi] for k, v in batch.columns.items()})
        t_start = time.perf_counter()
        reuse = self._reuse_sampler_logprobs()
        sampled = self._sample(local.prompts, local.columns, greedy=False, seed=derive_seed(cfg.seed, step, stream=2),
                               with_logprobs=reuse, draw_rows=(lo, B) if procs.distributed else None)
        outputs = self._decode(sampled)
        t_gen = time.perf_counter()

        env_out = self.environment.step(local.prompts, outputs, local.columns,
                                        seed=self._env_seed(derive_seed(cfg.seed, step, stream=3) % (2**31), lo))
        procs.agreed(check_env_output, self.environment, env_out, local.prompts, first_episode=lo)
        if procs.distributed:
            outputs, env_out = procs.gather_objects(outputs), gather_env_output(procs, env_out)
        self._check_scores(env_out.scores, env_out.per_func, step, last_good, batch.prompts)
        scores = torch.tensor(env_out.scores, dtype=torch.float32, device=self.device)
        self._check_scores(scores.tolist(), {}, step, last_good, batch.prompts, note=" (overflows float32)")
        t_env = time.perf_counter()

        update_generator = self._update_generator(step)
        # The fast backend's critic runs once on the update's first micro-batch, here, with its graph.
        carried = self.updater.carry_values(sampled.query_ids, sampled.query_mask, sampled.response_ids,
                                            sampled.response_mask, update_generator)
        # A sharded policy (FSDP2 / ZeRO-3) is scored with its full weights, as it generates.
        with torch.no_grad(), gathered_for_generation(self.trainable):
            values = sampled.values if reuse else None
            if carried is not None:
                values = self.updater.scoring_values(carried, sampled.query_ids, sampled.query_mask,
                                                     sampled.response_ids, sampled.response_mask,
                                                     chunk=cfg.local_rollout_forward_batch_size)
            logprobs, ref_logprobs, values = score_rollout(
                self.policy, self._ref_logprobs, self.value_model, sampled.query_ids, sampled.query_mask,
                sampled.response_ids, sampled.response_mask, temperature=cfg.temperature,
                chunk=cfg.local_rollout_forward_batch_size, logprobs=sampled.logprobs if reuse else None,
                values=values)
            rollout = Rollout(query_ids=sampled.query_ids, query_mask=sampled.query_mask,
                              response_ids=sampled.response_ids, response_mask=sampled.response_mask,
                              ended=sampled.ended, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
                              scores=scores)
            if procs.distributed:
                rollout = gather_rollout(procs, rollout, self.pad_id)
                sampled.ended = rollout.ended
            if cfg.missing_eos_penalty is not None:
                scores = scores - cfg.missing_eos_penalty * (~sampled.ended).float()
                rollout.scores = scores
            adv = compute_advantages(rollout, self.ops, kl_coef=self.kl_ctl.value, kl_estimator=cfg.kl_estimator,
                                     gamma=cfg.gamma, lam=cfg.lam, whiten_rewards=cfg.whiten_rewards,
                                     whiten_advantages=cfg.whiten_advantages)
        self.last_rollout = rollout
        t_logprobs = time.perf_counter()

        stats, lr_used = self._ppo_update(step, rollout, adv, last_good, update_generator, carried)
        t_end = time.perf_counter()

        n_resp = int(rollout.response_mask.sum())
        step_time = t_end - t_start
        metrics = {
            **self._ppo_step_metrics(rollout, adv, scores, stats, lr_used=lr_used, num_eos=int(sampled.ended.sum()),
                                     batch_size=B, per_func=env_out.per_func),
            "completions/mean_length": n_resp / B,
            "timing_s/prompter_gen": t_gen - t_start,
            "timing_s/target_gen": env_out.timings.get("target_gen", 0.0),
            "timing_s/reward": env_out.timings.get("reward", 0.0),
            "timing_s/logprobs": t_logprobs - t_env,
            "timing_s/update": t_end - t_logprobs,
            "timing_s/step": step_time,
            "tokens/s": (n_resp + env_out.generated_tokens) / step_time if step_time > 0 else 0.0,
            "tokens/s/prompter_gen": n_resp / (t_gen - t_start) if t_gen > t_start else 0.0,
        }
        samples = [{"prompt": p, "output": o, "answer": a[0] if a else "", "score": s}
                   for p, o, a, s in zip(batch.prompts, outputs, env_out.answers, scores.tolist())]
        return metrics, samples

    def _update_generator(self, step: int) -> torch.Generator:
        """The generator of step `step`'s PPO update (its mini-batch permutations): seed stream 4."""
        return torch.Generator().manual_seed(derive_seed(self.config.seed, step, stream=4))

    def _ppo_update(self, step: int, rollout: Rollout, adv, last_good, generator: torch.Generator | None = None,
                    carried=None) -> tuple:
        """The clipped PPO updates of one step, then the LR schedule's step: (UpdateStats, the learning rate
        those updates used; the scheduler has already moved to the next step's). generator: the step's
        update generator (seed stream 4), from which carried (PPOUpdater.carry_values) drew epoch 0's order."""
        if generator is None:
            generator = self._update_generator(step)
        try:
            stats = self.updater.update(rollout, adv, generator, carried)
        except NonFiniteLoss as err:
            raise TrainingDivergedError(
                f"alignfast: non-finite loss at step {step + 1}: {err}. Training stopped; the parameters in memory "
                f"may be partly updated, the last good checkpoint is {last_good or 'none (no checkpoint yet)'}",
                step=step + 1, checkpoint=last_good) from None
        self.last_update_losses = stats.losses
        lr_used = float(self.optimizer.param_groups[0]["lr"])  # torchao keeps it as a tensor
        if stats.optimizer_steps:
            # A step without any optimizer step (Proxy-RLHF: every token forced, no decision) leaves the schedule
            # where it was, as transformers' Trainer does when it skips one: the schedule counts updates, and torch
            # warns of (and skips) the first LR value when the scheduler steps before the optimizer ever has.
            self.lr_scheduler.step()
        return stats, lr_used

    def _ppo_step_metrics(self, rollout: Rollout, adv, scores: torch.Tensor, stats, *, lr_used: float, num_eos: int,
                          batch_size: int, per_func: dict) -> dict:
        """Close a PPO step for every trainer on this engine: the KL controller sees the batch's mean sequence KL
        (sum_t kl_t), the episode count advances, and the step's metrics under TRL's names are returned:
        objective/kl = mean_b sum_t kl_bt, objective/non_score_reward = mean_b sum_t -beta kl_bt,
        objective/rlhf_reward = non_score_reward + mean score, the update's averages, rewards/<function>.

        The KL measured (objective/kl, and what the controller tracks against kl_target) is a KL estimate: the
        penalty's own estimator when it is one (k1, or k3, both unbiased, as TRL), else k1. k2 (half the squared
        log-ratio) and abs are penalties, not KL estimates: summed, they moved the controller the wrong way."""
        if self.config.kl_estimator in ("k1", "k3"):
            kl_seq = adv.kl.sum(1)
        else:
            kl_seq = ((rollout.logprobs - rollout.ref_logprobs) * rollout.response_mask).sum(1)
        non_score = (-self.kl_ctl.value * adv.kl).sum(1)
        kl_coef_used = self.kl_ctl.value
        self.kl_ctl.update(float(kl_seq.mean()), batch_size)
        self.episode += batch_size
        metrics = {
            "objective/kl": float(kl_seq.mean()),
            "objective/entropy": float((-rollout.logprobs).sum(1).mean()),
            "objective/non_score_reward": float(non_score.mean()),
            "objective/rlhf_reward": float(non_score.mean() + scores.mean()),
            "objective/scores": float(scores.mean()),
            "objective/kl_coef": kl_coef_used,
            **stats.averages(),
            "val/num_eos_tokens": num_eos,
            "lr": lr_used,
            "episode": self.episode,
        }
        for name, values in per_func.items():
            vals = [v for v in values if v is not None]
            if vals:
                metrics[f"rewards/{name}"] = sum(vals) / len(vals)
        return metrics

    def _reuse_sampler_logprobs(self) -> bool:
        """Old log-probs (and a shared value head's values) from the sampler: fast path only. The sampler's
        KV-cached decode computes the same hidden states as a full forward (to float32 rounding), so the
        rollout phase's own policy forward is not needed (bench/NOTES-trainer.md)."""
        if self.config.backend != "fast":
            return False
        if self.config.reuse_sampler_logprobs is not None:
            return self.config.reuse_sampler_logprobs
        return next(self.model.parameters()).dtype == torch.float32

    def _env_seed(self, seed: int, first_row: int) -> int:
        """The environment's seed for this process's rows. The environments seed their target calls per
        chunk of `batch_size` requests (seed + chunk index); a share starting at a chunk boundary gets the
        seeds one process gives those rows. Other shares draw different (equally distributed) target
        samples: exact N-process parity then needs a deterministic target (temperature 0)."""
        if first_row == 0:
            return seed
        chunk = getattr(self.environment, "batch_size", None)
        if isinstance(chunk, int) and chunk > 0 and first_row % chunk == 0:
            return seed + first_row // chunk
        if isinstance(chunk, int) and not getattr(self, "_warned_env_seed", False):
            self._warned_env_seed = True
            _log.warning("the %d episodes per process are not a multiple of the environment's batch_size %s: a "
                         "sampled target draws other samples than one process would", first_row, chunk)
        return seed + first_row

    def _sample(self, prompts, columns, *, greedy: bool, seed: int, with_logprobs: bool = False,
                draw_rows: tuple[int, int] | None = None) -> SampledBatch:
        cfg = self.config
        if draw_rows is not None:  # this process's rows of the global batch
            policy_seed = self._env_seed(derive_seed(seed, 0, stream=7) % (2**31), draw_rows[0])
        else:
            policy_seed = derive_seed(seed, 0, stream=7) % (2**31)
        requests = self.environment.policy_requests(prompts, columns, seed=policy_seed)
        if draw_rows is not None:  # a training step under N processes: every process raises together
            requests = self.processes.agreed(check_requests, self.environment, requests, columns, len(prompts))
        else:
            requests = check_requests(self.environment, requests, columns, len(prompts))
        rows = self._cut_policy_inputs([templates.user_turn_ids(self.tokenizer, r,
                                                                system_prompt=self.policy_system_prompt)
                                        for r in requests])
        query_ids, query_mask = left_pad(rows, self.pad_id, self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        logprob_fn = None
        if with_logprobs:
            token_logprobs = self.ops.token_logprobs

            def logprob_fn(logits, tokens, temperature):
                return token_logprobs(logits, tokens, temperature=temperature)
        value_fn = self.policy._values if with_logprobs and self.shared_value_head is not None else None
        # A sharded policy (FSDP2, ZeRO-3: the Oracle arm's target) is gathered for generation.
        with gathered_for_generation(self.trainable):
            return sample(self.model, query_ids, query_mask, max_new_tokens=cfg.response_length,
                          stop_ids=self.stop_ids, pad_id=self.pad_id, temperature=0.0 if greedy else cfg.temperature,
                          top_k=cfg.top_k, top_p=cfg.top_p, generator=generator, logprob_fn=logprob_fn,
                          value_fn=value_fn, draw_rows=draw_rows)

    def _decode(self, sampled: SampledBatch) -> list[str]:
        out = []
        stop = set(self.stop_ids)
        for ids, mask in zip(sampled.response_ids.tolist(), sampled.response_mask.tolist()):
            tokens = [t for t, m in zip(ids, mask) if m and t not in stop]
            out.append(self.tokenizer.decode(tokens, skip_special_tokens=True).strip())
        return out

    def _ref_logprobs(self, q_ids, q_mask, r_ids, r_mask) -> torch.Tensor:
        t = self.config.temperature
        if self.ref_model is None:  # PEFT: the reference is the base model, adapter disabled
            with self.model.disable_adapter():
                return self._ref_policy.forward(q_ids, q_mask, r_ids, r_mask, temperature=t).logprobs
        return self._ref_policy.forward(q_ids, q_mask, r_ids, r_mask, temperature=t).logprobs

    def _check_scores(self, scores: list, per_func: dict, step: int, last_good, prompts, note: str = "") -> None:
        for i, s in enumerate(scores):
            if s is None or not math.isfinite(s):
                culprit = note
                for name, values in per_func.items():
                    v = values[i]
                    if v is not None and not math.isfinite(v):
                        culprit = f" (reward function '{name}' returned {v})"
                        break
                raise TrainingDivergedError(
                    f"alignfast: non-finite reward {s} at step {step + 1} for episode {i}{culprit}, prompt "
                    f"{prompts[i][:80]!r}. Training stopped before any update of this step; the last good "
                    f"checkpoint is {last_good or 'none (no checkpoint yet)'}", step=step + 1, checkpoint=last_good)

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def _trainable_state(self) -> dict:
        """The trained tensors, not copied: the checkpoint is written from them before training goes on (a
        clone would cost a copy of the policy and the critic, 1 GiB for a 135M pair, at every save)."""
        state = {"policy": {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}}
        if self.value_model is not None:
            state["value_model"] = {k: v.detach() for k, v in self.value_model.state_dict().items()}
        if self.shared_value_head is not None:
            state["value_head"] = {k: v.detach() for k, v in self.shared_value_head.state_dict().items()}
        return state

    def _save_checkpoint(self) -> Path:
        cfg = self.config
        state = {"global_step": self.global_step, "episode": self.episode, "kl_controller": self.kl_ctl.state_dict(),
                 "history": self.history, "config": cfg.to_dict(), "arm": self.arm, "num_steps": self.num_steps,
                 "reference_fingerprint": self._reference_fingerprint(),
                 "num_processes": self.processes.num_processes, "train_rows": len(self.train_dataset),
                 "train_fingerprint": self._train_fingerprint(), "target": self._target_identity(),
                 "rewards": self._reward_setup(), "reward_models": self._reward_models(), **self._environment_record()}

        def save_policy(path):
            self.model.save_pretrained(str(path))
            self.tokenizer.save_pretrained(str(path))

        path = Path(cfg.output_dir) / f"checkpoint-{self.global_step}"
        trainable, optimizer = (self._trainable_state(), self.optimizer) if not self.processes.sharded_state else \
            ({"policy": {}}, _NoState())
        if self.processes.sharded_state:  # FSDP2 / ZeRO-3: one shard per process, moved in with the main files
            save_policy = save_sharded_state(self.processes, cfg.output_dir, self.global_step, self.trainable,
                                             self.model, self.tokenizer)
        if self.processes.is_main:
            path = ckpt.save_checkpoint(cfg.output_dir, self.global_step, trainable=trainable,
                                        optimizer=optimizer, scheduler=self.lr_scheduler, trainer_state=state,
                                        save_policy=save_policy, total_limit=cfg.save_total_limit)
        self.processes.wait()  # no process runs ahead of (or resumes from) a half-written checkpoint
        return path

    # What the frozen reference weights are, for the error of a resume from a run trained from others.
    reference_weights_text = "its reference (SFT) weights differ from this run's policy before training"
    # The likely causes of a trained tensor whose shape differs from the checkpoint's, for that error.
    resume_shape_hint = "another model, or another LoRA rank?"

    def _reference_fingerprint(self) -> str:
        """Identity of the frozen reference policy (the reference model, or LoRA's frozen base weights)."""
        ref = self.ref_model if self.ref_model is not None else self.model
        return reference_fingerprint((n, p) for n, p in ref.named_parameters() if not p.requires_grad
                                     or ref is self.ref_model)

    def _train_fingerprint(self) -> str:
        if getattr(self, "_train_fp", None) is None:
            self._train_fp = prompts_fingerprint(self.train_dataset.prompts, self.train_dataset.columns)
        return self._train_fp

    def _target_identity(self) -> dict | None:
        """{name, weights}: the frozen target's name and a cheap fingerprint of its weights (reference_fingerprint)
        when it runs here; its model name alone behind an endpoint; None where the policy is the target (the
        Oracle: its reference fingerprint covers it)."""
        engine = getattr(self.environment, "target", None)
        if engine is None:
            return None
        module = frozen.target_module(self.environment)
        if module is not None:
            if getattr(self, "_target_fp", None) is None:
                name = getattr(getattr(module, "config", None), "_name_or_path", "") or type(module).__name__
                self._target_fp = {"name": str(name), "weights": reference_fingerprint(module.named_parameters())}
            return self._target_fp
        name = getattr(engine, "model", None)
        return {"name": name if isinstance(name, str) else type(engine).__name__, "weights": None}

    def _reward_setup(self) -> list | None:
        """[[name, weight], ...] of the reward functions (the reward model first)."""
        rewards = getattr(self, "rewards", None)
        if rewards is None:
            return None
        return [[name, float(w)] for name, w in zip(rewards.names, rewards.weights)]

    def _reward_models(self) -> dict | None:
        """{name: fingerprint} of the reward functions that are reward models (reference_fingerprint of their weights:
        a model swapped under the same name, which _reward_setup's names cannot tell, differs). Computed once: a
        reward model is frozen, and its fingerprint reads 32 values per tensor, however large the model."""
        rewards = getattr(self, "rewards", None)
        if rewards is None:
            return None
        if getattr(self, "_reward_fp", None) is None:
            self._reward_fp = {name: reference_fingerprint(f.model.named_parameters())
                               for name, f in zip(rewards.names, rewards.funcs) if isinstance(f, RewardModel)}
        return self._reward_fp

    def _warn_changed_settings(self, path: Path, saved: dict) -> list[str]:
        """A resume with other hyperparameters is allowed (it may be on purpose) but never silent: the run
        will not match an uninterrupted one. Returns the names of the settings that changed."""
        now = json.loads(self.config.to_json())  # the form the checkpoint stored
        changed = _changed_settings(saved, now)
        if changed:
            _log.warning("resuming from %s with settings that differ from the checkpoint's (%s): the run will not "
                         "match an uninterrupted one (AdamW's moments and the learning-rate schedule, learning rate "
                         "included, continue from the checkpoint; weight_decay, betas and eps are this run's)", path,
                         "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed))
        return changed

    def _load_checkpoint(self, path: Path) -> None:
        data = ckpt.load_checkpoint(path, map_location=self.device)
        check_same_arm(path, data["state"], self.arm)
        rebuilt = check_num_steps(path, data["state"], self.num_steps, self.config.lr_scheduler_type)
        sharded = check_resumable(self.processes, path, data["state"])
        if sharded:  # every process reads its shard of parameters and optimizer state
            with own_hyperparameters(self.optimizer):
                self.processes.accelerator.load_state(str(sharded))
            data["trainable"] = {"policy": {}}
        trainable = data["trainable"]
        if not sharded:  # accelerate's load_state has restored (and shape-checked) parameters and optimizer
            check_resume_matches(path, trainable, data["state"], self.model, self.config,
                                 value_model=self.value_model, value_head=self.shared_value_head,
                                 label=self.policy_role, shape_hint=self.resume_shape_hint)
        ref_state = data["state"]
        if ref_state.get("reference_fingerprint") == EMPTY_FINGERPRINT:  # recorded no frozen weight: nothing to check
            ref_state = {**ref_state, "reference_fingerprint": None}
        check_same_reference(path, ref_state, self._reference_fingerprint(), self.arm,
                             weights=self.reference_weights_text)
        if not sharded:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in trainable["policy"].items():
                    params[name].copy_(value)
            if self.value_model is not None:
                self.value_model.load_state_dict(trainable["value_model"])
            if self.shared_value_head is not None:
                self.shared_value_head.load_state_dict(trainable["value_head"])
            saved_optim = (data["state"].get("config") or {}).get("optim", "adamw_torch")
            if saved_optim != self.config.optim:  # another optimizer's state cannot be loaded into this one
                fail("optim", f"is '{self.config.optim}' but {path} was written with '{saved_optim}': resume with "
                     f"optim: {saved_optim}")
            data["optimizer"], data["scheduler"] = regrouped_state(data["optimizer"], data["scheduler"],
                                                                   self.optimizer)
            with own_hyperparameters(self.optimizer):
                self.optimizer.load_state_dict(data["optimizer"])
        self.lr_scheduler.load_state_dict(data["scheduler"])
        if rebuilt:
            follow_schedule(self.lr_scheduler)
        ckpt.set_rng_state(data["rng"])
        state = data["state"]
        config_changes = self._warn_changed_settings(path, state.get("config") or {})
        warn_other_train_rows(path, state, len(self.train_dataset), self._train_fingerprint(), what="training prompts",
                              setting="data.train in a run file; train_dataset in Python")
        warn_other_inputs(path, state, target=self._target_identity(), rewards=self._reward_setup(),
                          reward_models=self._reward_models(), environment=self._environment_record(),
                          changes_said=config_changes)
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.global_step = int(state["global_step"])
        self.episode = int(state["episode"])
        self.history = list(state["history"])


# Settings a resumed run may change without changing what it computes (where it writes, how often it logs or
# saves, how long it runs).
_RESUME_NEUTRAL = {"output_dir", "overwrite_output_dir", "run_name", "report_to", "logging_steps", "num_logged_samples",
                   "save_strategy", "save_steps", "save_total_limit", "eval_steps", "per_device_eval_batch_size",
                   "total_episodes", "num_train_epochs", "max_steps", "device", "share_frozen_weights",
                   "malloc_mmap_threshold"}
# Not neutral: gradient_checkpointing (a checkpointed policy keeps ATen's GEMMs: other roundings); a change of
# total_episodes / num_train_epochs / max_steps rebuilds the LR schedule (resume_checks.check_num_steps says so).


def _changed_settings(saved: dict, now: dict) -> list[str]:
    return sorted(k for k in now if k not in _RESUME_NEUTRAL and k in saved and saved[k] != now[k])


def _special_ids(tokenizer, model, extra_stop: int | None) -> tuple[int, list[int]]:
    """(pad id, stop ids). Without a pad token the EOS id pads: masks come from positions, never from ids."""
    eos = tokenizer.eos_token_id
    stops = set()
    if eos is not None:
        stops.add(int(eos))
    gen_cfg = getattr(model, "generation_config", None)
    gen_eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(gen_eos, int):
        stops.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        stops.update(int(e) for e in gen_eos)
    if extra_stop is not None:
        stops.add(int(extra_stop))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos if eos is not None else (min(stops) if stops else None)
    if pad is None:
        raise AlignfastArgumentError("alignfast: the policy tokenizer has neither a pad nor an EOS token; set "
                                     "tokenizer.pad_token or config.stop_token_id")
    if not stops:
        raise AlignfastArgumentError("alignfast: the policy tokenizer has no EOS token: set config.stop_token_id so "
                                     "responses can end")
    _check_ids_in_vocab(model, pad, eos, extra_stop, stops)
    return int(pad), sorted(stops)


def _check_ids_in_vocab(model, pad, eos, extra_stop, stops) -> None:
    """An id at or past the vocabulary would never be sampled (a stop that never stops) or index past the
    embedding (a pad token added to the tokenizer without resize_token_embeddings)."""
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = getattr(getattr(emb, "weight", None), "shape", (None,))[0] or getattr(getattr(model, "config", None),
                                                                              "vocab_size", None)
    if not vocab:
        return
    if extra_stop is not None and not 0 <= int(extra_stop) < vocab:
        fail("stop_token_id", f"({extra_stop}) is outside the policy's vocabulary [0, {vocab})")
    for what, i in (("pad token id", pad), ("EOS token id", eos), *(("stop id (generation_config.eos_token_id)", s)
                                                                  for s in stops)):
        if i is not None and not 0 <= int(i) < vocab:
            raise AlignfastArgumentError(f"alignfast: the policy tokenizer's {what} {i} is outside the model's "
                                         f"vocabulary [0, {vocab}): resize the embeddings "
                                         "(model.resize_token_embeddings(len(tokenizer))) or fix the tokenizer")
