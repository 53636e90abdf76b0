"""The optimizer of the trained parameters, chosen by config.optim (Hugging Face TrainingArguments' names).

    adamw_torch       torch.optim.AdamW, exact; m and v in the parameters' dtype: 8 bytes per float32 parameter
    adamw_torch_8bit  torchao.optim.AdamW8bit: m and v block-quantised to 8 bits (dynamic-tree codes, one float32
                      scale per 256 values): ~2 bytes per parameter
    adamw_torch_4bit  torchao.optim.AdamW4bit: 4 bits, blocks of 128: ~1 byte per parameter

The low-bit variants do the AdamW update in float32 from the dequantised state and re-quantise it each step
(Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"; Li et al. 2023 for 4 bits); tensors with
fewer than 4096 elements (or not a multiple of the block) keep float32 state. They step one parameter at a time
through a torch.compile'd kernel (compiled once per parameter shape: the first step of a run takes seconds to
tens of seconds on CPU), so the foreach temporary that bounded_param_groups caps does not exist there.
"""

from __future__ import annotations

import contextlib

import torch

from alignfast.ops._checks import fail
from alignfast.trainer.config import OPTIMIZERS  # noqa: F401 - the names, validated by the config
from alignfast.trainer.ppo_core import bounded_param_groups

_TORCHAO = {"adamw_torch_8bit": "AdamW8bit", "adamw_torch_4bit": "AdamW4bit"}


def adamw_kernel(backend: str, params: list[torch.nn.Parameter]) -> dict:
    """How torch's AdamW runs the (identical) update: {"fused": True} on the fast backend, {"foreach": True}
    otherwise.

    foreach AdamW makes ~10 passes over every parameter-sized list (lerp, mul, addcmul, sqrt into a
    temporary, div, add, addcdiv, ...), each memory-bound: a third of a PPO step of a 135M policy with its
    critic on CPU (bench/NOTES-trainer.md). The fused kernel reads p, g, m, v and writes p, m, v once per
    element: the same AdamW, rounding apart. It needs floating-point parameters on a device torch fuses for
    (CPU, CUDA, ...; FSDP2's DTensor shards have the fused op too). The choice depends on the backend alone,
    so one process and N processes, sharded or not, run the same kernel (bitwise-equal resumes).
    """
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    fusable = backend == "fast" and all(
        p.is_floating_point() and p.device.type in _get_fused_kernels_supported_devices() for p in params)
    return {"fused": True} if fusable else {"foreach": True}


def torchao_optim(name: str):
    """The torchao optimizer class behind `name`, or an error naming `optim` when torchao is missing."""
    try:
        import torchao.optim as ao
    except ImportError:
        fail("optim", f"'{name}' needs torchao: pip install 'alignfast[lowbit]' (or pip install torchao)")
    return getattr(ao, _TORCHAO[name])


def no_weight_decay(modules) -> set[int]:
    """ids of the parameters that transformers' Trainer (and so TRL) exempts from weight decay: biases and norm
    weights (LayerNorm modules, and names such as *layernorm*, *rmsnorm*, norm, *_norm). The rule is the
    Trainer's own method, called without a Trainer (it reads only the model), so it follows transformers."""
    from transformers import Trainer

    ids = set()
    for module in modules:
        if module is None:
            continue
        decayed = set(Trainer.get_decay_parameter_names(None, module))
        ids |= {id(p) for name, p in module.named_parameters() if name not in decayed}
    return ids


def make_optimizer(params: list[torch.nn.Parameter], config, no_decay: set[int] | None = None) -> torch.optim.Optimizer:
    """AdamW over params; no_decay (parameter ids, see no_weight_decay) get weight_decay 0 when config.weight_decay
    is set (with 0 the groups stay as they were, so checkpoints of earlier runs resume)."""
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                  weight_decay=config.weight_decay)
    no_decay = (no_decay or set()) if config.weight_decay else set()
    groups = bounded_param_groups(params, no_decay=no_decay)
    if config.optim == "adamw_torch":
        # The fast backend: torch's fused AdamW, one pass per element. Otherwise foreach, one multi-tensor kernel
        # per AdamW op instead of a Python loop over parameters (torch picks it by default on CUDA only; it is
        # faster on CPU too); its sqrt(v) temporary is as large as a param group, so the params come in groups of
        # bounded size (bitwise the same update). See adamw_kernel.
        return torch.optim.AdamW(groups, **adamw_kernel(config.backend, params), **kwargs)
    # These step parameter by parameter, so a group's size makes no temporary: groups only where the decay changes,
    # the parameters in their order (as above: a checkpoint's per-parameter state is keyed by that order).
    groups = bounded_param_groups(params, max_numel=max(1, sum(p.numel() for p in params)), no_decay=no_decay)
    return torchao_optim(config.optim)(groups, amsgrad=False, **kwargs)


# Hyperparameters a run's config sets: a resumed run applies its own (torch's load_state_dict would restore the
# saved ones, so a changed weight_decay, say, was logged as changed and silently not applied). lr is the schedule's.
CONFIG_HYPERPARAMETERS = ("weight_decay", "betas", "eps")


@contextlib.contextmanager
def own_hyperparameters(optimizer: torch.optim.Optimizer):
    """Around a load that restores the saved groups' hyperparameters wholesale (torch's load_state_dict, accelerate's
    load_state of a sharded checkpoint): this run's weight_decay, betas and eps are put back afterwards."""
    own = [{k: g[k] for k in CONFIG_HYPERPARAMETERS if k in g} for g in optimizer.param_groups]
    yield
    for group, values in zip(optimizer.param_groups, own, strict=True):
        group.update(values)


def regrouped_state(saved: dict, saved_scheduler: dict, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(optimizer, LR scheduler) state_dicts fitted to this optimizer's groups (load them inside
    own_hyperparameters, which keeps this run's weight_decay, betas and eps).

    When only the group boundaries differ (a checkpoint written before biases and norm weights got their own
    weight_decay-0 groups, or weight decay switched on or off) the state is fitted to this optimizer's groups:
    the parameters are the same, in the same order (make_optimizer keeps it), and the per-parameter state (AdamW's
    m, v, step) is keyed by position over all groups, so it carries over as it is; each new group takes the saved
    lr (as the schedule left it) and the scheduler's per-group entries (base_lrs, ...) of the group its first
    parameter was in. torch refuses a state whose groups differ in number or size, and so does this when the
    saved per-parameter state does not have this run's parameter shapes in that order."""
    saved_groups = saved["param_groups"]
    current = optimizer.param_groups
    sizes = [len(g["params"]) for g in current]
    if sizes == [len(g["params"]) for g in saved_groups] or sum(sizes) != sum(len(g["params"]) for g in saved_groups):
        return saved, saved_scheduler  # the same groups, or other parameters: torch's own checks speak
    flat = [i for g in saved_groups for i in g["params"]]
    params = [p for g in current for p in g["params"]]
    for index, p in zip(flat, params):  # the same order of the same parameters, or no regrouping
        moment = saved["state"].get(index, {}).get("exp_avg")
        if isinstance(moment, torch.Tensor) and tuple(moment.shape) != tuple(p.shape):
            return saved, saved_scheduler
    owner = [k for k, g in enumerate(saved_groups) for _ in g["params"]]
    groups, owners, start = [], [], 0
    for size in sizes:
        owners.append(owner[start])
        groups.append({**saved_groups[owner[start]], "params": flat[start:start + size]})
        start += size
    scheduler = {k: [v[o] for o in owners] if isinstance(v, list) and len(v) == len(saved_groups) else v
                 for k, v in saved_scheduler.items()}
    return {"state": saved["state"], "param_groups": groups}, scheduler
