"""The trainer across processes: accelerate owns the process group, placement, DDP/FSDP2/ZeRO wrapping,
backward, clipping and collectives; this module says how one PPO step is split over N processes.

Launched by `accelerate launch` or `torchrun` (WORLD_SIZE > 1), every process builds the same trainer;
one process without a launcher builds no Accelerator at all and runs exactly the single-process code.

One PPO step over a global batch of B episodes, process r of N (B and every batch size are global):

    rows [r·B/N, (r+1)·B/N) of the batch   sample (each row's random draws are those it gets in a
                                           1-process run: sampling.sample(draw_rows=...)),
                                           the environment (target + reward), old/ref log-probs, values
    all-gather (padded)                    every process holds the global rollout [B, ...]: advantages,
                                           whitening, the KL controller's mean KL and the metrics are
                                           those of the global batch, computed by the same fused op
                                           that one process runs (B x R elementwise work, replicated)
    mini-batch m, micro-batches k          process r runs micro-batches [r·G/N, (r+1)·G/N) of the same
                                           mini-batch permutation as 1 process, with loss scale
                                           N · n_k / n_m (n: response tokens), so the data-parallel
                                           MEAN of the gradients is the gradient of the mini-batch's
                                           token-mean loss (verl's agg_loss "token-mean"):
                                               (1/N) Σ_r Σ_{k∈r} N n_k/n_m · ∇ℓ_k = ∇ (Σ_k n_k ℓ_k / n_m)
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from alignfast.launch_env import launched_world_size
from alignfast.ops._checks import fail


def launched_device(device: str) -> str:
    """`cuda` under a launcher means this process's GPU (cuda:LOCAL_RANK); anything else is kept."""
    if device == "cuda" and launched_world_size() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def end_processes() -> None:
    """Destroy the process group, if a launcher's run made one, at the end of a process that succeeded.

    A process that exits with a gloo group alive can abort in the interpreter's teardown ("terminate called
    without an active exception", pytorch/pytorch#190489), and the launcher then reports a finished run as
    failed. Entry points call this once, after their last collective; the trainers do not, since one process
    may run several of them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class Processes:
    """The process group seen by the trainer. `accelerator` is None for a single process without a launcher."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.num_processes = accelerator.num_processes if accelerator is not None else 1
        self.index = accelerator.process_index if accelerator is not None else 0
        self.is_main = self.index == 0
        self.backward_scale = 1.0  # DeepSpeed divides each micro-batch loss by its accumulation steps

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1

    @property
    def sharded_state(self) -> bool:
        """Parameters/optimizer state split over processes (FSDP, DeepSpeed): checkpoints go through
        accelerate's save_state, one shard per process. ALIGNFAST_SHARDED_CHECKPOINTS=1 takes that path
        under DDP too (the CPU tests do: accelerate runs FSDP only on GPUs)."""
        if self.accelerator is None:
            return False
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) or \
            os.environ.get("ALIGNFAST_SHARDED_CHECKPOINTS", "0") == "1"

    # -- the split ------------------------------------------------------------------------------------
    def rows(self, total: int) -> tuple[int, int]:
        """[lo, hi) of this process's rows of a global batch of `total` rows (even split)."""
        per = total // self.num_processes
        return self.index * per, (self.index + 1) * per

    def micro_batches(self, per_mini_batch: int) -> range:
        """This process's micro-batch indices among a mini-batch's `per_mini_batch`."""
        per = per_mini_batch // self.num_processes
        return range(self.index * per, (self.index + 1) * per)

    def check_config(self, config) -> None:
        """The global batch must split evenly: every process runs the same number of micro-batches."""
        n, g, p = self.num_processes, config.gradient_accumulation_steps, config.per_device_train_batch_size
        if n > 1 and g % n:
            hint = f"; the same batch: per_device_train_batch_size {p // n} with gradient_accumulation_steps {g * n}" \
                if p % n == 0 else ""
            batch = (f"{config.rollout_batch_size} episodes (per_device_train_batch_size {p} x gradient_accumulation_"
                     f"steps {g} x num_mini_batches {config.num_mini_batches})") if hasattr(config, "num_mini_batches") \
                else f"{p * g} rows (per_device_train_batch_size {p} x gradient_accumulation_steps {g})"
            fail("gradient_accumulation_steps", f"({g}) must be a multiple of the number of processes ({n}): the "
                 f"global batch of {batch} is split by micro-batches over the processes{hint}")

    # -- collectives (no-ops for one process) ---------------------------------------------------------
    def gather_rows(self, x: torch.Tensor, *, pad_value=0, left: bool = False) -> torch.Tensor:
        """Concatenate every process's rows in process order, padding dim 1 to the widest first
        (left padding for left-padded queries)."""
        if not self.distributed:
            return x
        if x.dim() > 1:
            x = self.accelerator.pad_across_processes(x.contiguous(), dim=1, pad_index=pad_value, pad_first=left)
        return self.accelerator.gather(x.contiguous())

    def gather_objects(self, items: list) -> list:
        """Concatenate every process's list of picklable items in process order."""
        if not self.distributed:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def sum(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.gather(t).sum())

    def max_int(self, value: int) -> int:
        """The largest of every process's `value` (collective; the value itself for one process)."""
        if not self.distributed:
            return value
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.accelerator.device)
        return int(self.accelerator.gather(t).max())

    def agreed(self, work, *args, **kwargs):
        """work(*args, **kwargs) on every process, then one agreement on whether it raised anywhere (a collective
        when distributed). Each process's work sees its own share or its own disk; one that raised alone would leave
        the others waiting in the next collective. So every process raises together: the failing one its own
        error (anything: an OSError too), the others one line naming it."""
        error, result = None, None
        try:
            result = work(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - agreed on first, then re-raised as it was on this process
            error = err
        if self.distributed and self.max_int(int(error is not None)):
            if error is None:
                from alignfast.ops._checks import AlignfastArgumentError

                raise AlignfastArgumentError(f"alignfast: {self.gather_objects([])[0]}")
            line = (str(error).splitlines() or [""])[0].removeprefix("alignfast: ")
            self.gather_objects([f"failed on another process: {type(error).__name__}: {line}"])
        if error is not None:
            raise error
        return result

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def no_sync(self, module, last: bool):
        """Gradient all-reduce only on the last backward of an accumulation."""
        if self.accelerator is None or last:
            return nullcontext()
        return self.accelerator.no_sync(module)


def make_processes(config) -> Processes:
    """An Accelerator when launched on several processes (its plugins come from the launcher's config or
    environment: `accelerate launch --config_file configs/accelerate/fsdp2.yaml`); none otherwise."""
    if launched_world_size() <= 1:
        return Processes(None)
    from accelerate import Accelerator

    # On a machine without accelerators accelerate runs the CPU/gloo process group only when asked.
    cpu = config.device == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu)
    from accelerate.utils import DistributedType

    for flag, kind in (("ACCELERATE_USE_FSDP", DistributedType.FSDP), ("ACCELERATE_USE_DEEPSPEED",
                                                                       DistributedType.DEEPSPEED)):
        # accelerate falls back to plain DDP (MULTI_CPU) without a word where it cannot shard (FSDP2 on CPU): a
        # run that asked for sharding and would hold every weight on every process instead.
        if _env_flag(flag) and accelerator.distributed_type != kind:
            fail("device", f"is {'cpu' if cpu else 'cuda'}, where accelerate runs this {kind.value} launch "
                 f"({flag}=true: the launcher's config) as {accelerator.distributed_type.value}, without "
                 f"sharding: launch {kind.value} on GPUs, or with configs/accelerate/ddp.yaml")
    processes = Processes(accelerator)
    processes.check_config(config)

    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # UNTESTED: DeepSpeed does not run on CPU CI
        # The engine steps itself every `gradient_accumulation_steps` backward calls, clips by its config and
        # scales each loss by 1 / those steps: tell it this process's share of a mini-batch and undo the scale.
        steps = config.gradient_accumulation_steps // processes.num_processes
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds.update(train_micro_batch_size_per_gpu=config.per_device_train_batch_size,
                  gradient_accumulation_steps=steps, gradient_clipping=config.max_grad_norm or 0.0)
        processes.backward_scale = float(steps)
    return processes


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on", "t")


def check_launcher_backend() -> None:
    """A launch with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED) needs deepspeed installed: one line before any
    model loads, not a traceback per process after."""
    import importlib.util

    if _env_flag("ACCELERATE_USE_DEEPSPEED") and importlib.util.find_spec("deepspeed") is None:
        fail("ACCELERATE_USE_DEEPSPEED", "is set (an accelerate launch with a DeepSpeed config: distributed_type "
             "DEEPSPEED) but deepspeed is not installed: pip install deepspeed, or launch with "
             "configs/accelerate/ddp.yaml or fsdp2.yaml")


class TrainableModules(nn.Module):
    """The policy, its value head or critic, as ONE module: what DDP/FSDP2/ZeRO wrap. Its forward is the
    update phase's forward (new log-probs, entropy, values), so the wrapper's hooks see every trained
    parameter (calling the policy's backbone directly would bypass DDP's gradient synchronisation)."""

    def __init__(self, model: nn.Module, policy, value_model: nn.Module | None, value_head: nn.Module | None):
        super().__init__()
        self.model = model
        self.value_model = value_model
        self.value_head = value_head
        self._policy = [policy]  # not a submodule: it holds references to the modules above

    def forward(self, query_ids, query_mask, response_ids, response_mask, *, temperature: float,
                entropy_grad: bool, **extra):
        # extra: a policy's own per-decision inputs (Proxy-RLHF's `features`), passed through unchanged.
        out = self._policy[0].forward(query_ids, query_mask, response_ids, response_mask, temperature=temperature,
                                      return_entropy=True, entropy_grad=entropy_grad, **extra)
        values = out.values
        if values is None:
            values = self.value_model(query_ids, query_mask, response_ids, response_mask)
        return out.logprobs, out.entropy, values


@contextmanager
def gathered_for_generation(module: nn.Module | None):
    """The full parameters of a sharded model for generation (TRL's unwrap_model_for_generation): FSDP2
    units are unsharded for the duration (a unit's own hooks may reshard and gather it again per forward), ZeRO-3
    parameters gathered with deepspeed.zero.GatheredParameters; replicated models (DDP, one process) pass
    through untouched."""
    if module is None:
        yield
        return
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # DeepSpeed ZeRO-3 partitioned parameters (UNTESTED)
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()


def gather_env_output(processes: Processes, env_out):
    """The global EnvOutput from every process's share (lists in episode order; tokens summed; this
    process's timings, which are the step-time split the main process reports)."""
    from alignfast.trainer.environments import EnvOutput

    per_func = {name: processes.gather_objects(values) for name, values in sorted(env_out.per_func.items())}
    return EnvOutput(scores=processes.gather_objects(env_out.scores), per_func=per_func,
                     answers=processes.gather_objects(env_out.answers),
                     requests=processes.gather_objects(env_out.requests), timings=dict(env_out.timings),
                     generated_tokens=int(processes.sum(env_out.generated_tokens)))


def gather_rollout(processes: Processes, rollout, pad_id: int, *, left_padded_queries: bool = True):
    """The global Rollout: every process's rows in order, queries left-padded (right-padded when
    left_padded_queries is False: Proxy-RLHF's left-aligned decisions) and responses right-padded to the global
    widths, per-decision features too: exactly the tensors one process building every row builds. Scores are
    the caller's."""
    from alignfast.trainer.ppo_core import Rollout

    g = processes.gather_rows
    left = left_padded_queries
    return Rollout(query_ids=g(rollout.query_ids, pad_value=pad_id, left=left),
                   query_mask=g(rollout.query_mask, pad_value=False, left=left),
                   response_ids=g(rollout.response_ids, pad_value=pad_id),
                   response_mask=g(rollout.response_mask, pad_value=False),
                   ended=g(rollout.ended), logprobs=g(rollout.logprobs), ref_logprobs=g(rollout.ref_logprobs),
                   values=g(rollout.values), scores=rollout.scores,
                   features=None if rollout.features is None else g(rollout.features))


class NoState:
    """The optimizer slot of a sharded checkpoint's main files (its state is in the shards)."""

    def state_dict(self) -> dict:
        return {}


SHARDS = "sharded"  # the folder of a checkpoint holding accelerate's per-process state


def save_sharded_state(processes: Processes, output_dir, step: int, trainable: nn.Module, model: nn.Module,
                       tokenizer):
    """Collective: every process writes its shard (accelerate save_state: parameters, optimizer, RNG) to a
    temporary folder and the full policy weights are gathered to the main process. Returns the main
    process's save_policy(path) for checkpoint.save_checkpoint, which writes the user-facing model and moves
    the shards into the checkpoint before its atomic rename (a half-written checkpoint never looks complete)."""
    from pathlib import Path

    from alignfast.trainer.checkpoint import TMP_SHARDS_PREFIX

    shards = Path(output_dir) / f"{TMP_SHARDS_PREFIX}{step}"
    processes.accelerator.save_state(str(shards))
    policy_state = gathered_policy_state(processes, trainable)
    processes.wait()

    def save_policy(path):
        model.save_pretrained(str(path), state_dict=policy_state)
        tokenizer.save_pretrained(str(path))
        os.replace(shards, Path(path).parent / SHARDS)

    return save_policy


def gathered_policy_state(processes: Processes, trainable: nn.Module) -> dict:
    """Collective: the policy's full state dict (TrainableModules' `model.` entries) on the main process
    ({} elsewhere under FSDP2 / ZeRO-3)."""
    full = processes.accelerator.get_state_dict(trainable) or {}
    return {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}


def check_resumable(processes: Processes, path, state: dict):
    """The shard folder to load (None: a replicated checkpoint). Replicated state resumes under any number
    of processes (the run does not depend on it); sharded state only under the same one, with sharding."""
    from pathlib import Path

    saved_n, n = int(state.get("num_processes", 1)), processes.num_processes
    shards = Path(path) / SHARDS
    if not shards.is_dir() and not processes.sharded_state:
        return None
    if shards.is_dir() and not processes.sharded_state:  # the process count may well be right: say what is not
        fail("num_processes", f"cannot resume {path}: its state is sharded over {saved_n} processes (FSDP2 / "
             f"ZeRO-3, or ALIGNFAST_SHARDED_CHECKPOINTS=1) and this launch does not shard; resume with the launcher "
             f"config it was written with, {saved_n} processes")
    if not shards.is_dir() or saved_n != n:
        written = f"its state is sharded over {saved_n} processes" if shards.is_dir() else \
            f"it holds replicated state from {saved_n} process(es) and this launch shards the state"
        fail("num_processes", f"{n} process(es) cannot resume {path}: {written}; resume with the launcher config "
             f"it was written with (accelerate launch --num_processes {saved_n})")
    return shards
