"""Frozen copies held once: the reference policy and the in-process target, when they are the same weights.

Align-Pro's first real run uses one chat model as both the prompter (whose initial weights are the KL
reference rho_sft) and the frozen target. With full fine-tuning the trainer would otherwise hold that model
three times: the trained policy, a deep copy as the reference, and the target. The reference and the target
are then the same function: same architecture and config, same weights bit for bit, same dtype, same
attention implementation, and neither ever changes. So the target's module can serve as the reference, and
the reference's log-probs are exactly those a separate copy would give (same module class, same tensors,
same kernels). With LoRA the reference is the policy's own base with the adapter disabled; there the frozen
base tensors of the policy can be the target's tensors (the adapter's weights stay the policy's own).

Sharing is decided by comparing the tensors themselves (a path or revision says nothing about a model object
that was edited after loading); it costs one pass over the weights at setup (~0.1 s per 100M parameters).
"""

from __future__ import annotations

import copy

import torch

# Config entries that do not change what a forward computes (names, bookkeeping, the dtype compared apart).
_NEUTRAL_CONFIG = {"_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                   "_commit_hash", "use_cache", "output_attentions", "output_hidden_states", "return_dict"}


def target_module(environment) -> torch.nn.Module | None:
    """The in-process target model behind the environment's engine (HFEngine.model), if any."""
    model = getattr(getattr(environment, "target", None), "model", None)
    return model if isinstance(model, torch.nn.Module) else None


def _config(model) -> dict | None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    d = {k: v for k, v in cfg.to_dict().items() if k not in _NEUTRAL_CONFIG}
    d["_attn_implementation"] = getattr(cfg, "_attn_implementation", None)
    return d


def _all_named(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def _frozen(module: torch.nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def same_function(policy: torch.nn.Module, candidate: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether the frozen `candidate` computes what `policy` with its parameters cast to `dtype` computes (as
    from_pretrained(dtype=...) loads a model: buffers such as rotary frequencies keep their own dtype): same
    class and config, same parameter and buffer names and shapes, on the policy's device, equal bit for bit,
    and no storage shared with the policy (the policy's tensors change as it trains)."""
    if candidate is policy or type(candidate) is not type(policy) or not _frozen(candidate):
        return False
    if _config(policy) is None or _config(policy) != _config(candidate):
        return False
    mine, theirs = _all_named(policy), _all_named(candidate)
    if mine.keys() != theirs.keys():
        return False
    param_names = {n for n, _ in policy.named_parameters(remove_duplicate=False)}
    mine_storage = {t.untyped_storage().data_ptr() for t in mine.values()}
    with torch.no_grad():
        for name, t in mine.items():
            u = theirs[name]
            if u.shape != t.shape or u.device != t.device or u.untyped_storage().data_ptr() in mine_storage:
                return False
            if u.dtype != (dtype if name in param_names and t.is_floating_point() else t.dtype):
                return False
            if not torch.equal(t.to(u.dtype), u):
                return False
    return True


def reference_copy(policy: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """A frozen copy of the policy with its floating parameters in `dtype` (None: the policy's own); buffers
    keep their dtype, as from_pretrained(dtype=...) gives them (rotary frequencies stay float32)."""
    return cast_parameters(copy.deepcopy(policy), dtype)


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """The module's floating parameters cast to `dtype` in place (tied ones stay tied); buffers unchanged."""
    if dtype is not None:
        for p in module.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return module


def _base_name(peft_name: str) -> str:
    """A LoRA-wrapped parameter's name in the plain model: base_model.model.X.base_layer.weight -> X.weight."""
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def share_frozen_base(peft_model: torch.nn.Module, target: torch.nn.Module) -> int:
    """Point the frozen base tensors of a LoRA policy at the equal tensors of the frozen target; returns the
    bytes freed. Only a tensor equal bit for bit (same name, shape, dtype, device) is shared, so the policy
    computes exactly what it did; tied parameters stay tied (the Parameter object is kept, its data swapped)."""
    if not _frozen(target):
        return 0
    base = getattr(getattr(peft_model, "base_model", None), "model", None)
    if base is None or _config(base) is None or _config(base) != _config(target):
        return 0
    theirs = _all_named(target)
    freed, seen = 0, set()
    with torch.no_grad():
        for name, p in peft_model.named_parameters(remove_duplicate=False):
            if p.requires_grad or id(p) in seen:
                continue
            u = theirs.get(_base_name(name))
            if u is None or u.shape != p.shape or u.dtype != p.dtype or u.device != p.device:
                continue
            if u.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() or not torch.equal(p, u):
                continue
            seen.add(id(p))
            freed += p.untyped_storage().nbytes()
            p.data = u.data
    return freed
