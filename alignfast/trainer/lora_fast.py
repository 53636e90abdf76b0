"""Lean LoRA projections for the fast backend: PEFT's forward, op for op, without its per-call Python.

PEFT's `lora.Linear.forward` with one active plain LoRA adapter (no DoRA or other variant), not merged,
computes

    y = base_layer(x)
    y = y + lora_B(lora_A(dropout(x'))) * scaling        x' = x cast to lora_A's dtype (when it differs)
    y = y.to(dtype of base_layer(x))

and, with the adapter disabled (the reference log-probs: `disable_adapter()`), y = base_layer(x). Around
those few ops each call runs argument checks, a loop over the active adapters, dict look-ups and three
submodule calls: ~15-25 us of Python per projection per call on this CPU (bench/NOTES-trainer.md: a
[4, 1, 576] input, PEFT 82-85 us, the same aten ops called directly 56-70 us, the base projection alone
31-35 us). The sampler pays it for every projection at every decoded token: 210 projections per token for a
30-layer model with LoRA on its 7 projections (~40 ms of a 16-token rollout of the SmolLM2-135M shape).

`install_lean_lora(model)` gives every covered `lora.Linear` an instance-level `forward` that issues the
same aten ops, in the same order, on the same tensors (`F.linear` as `nn.Linear.forward` calls it, the
multiply by the Python float `scaling`, the add, the cast), so its outputs and gradients are PEFT's bit for
bit (tests/trainer/test_lora_fast.py). The adapter's parameters, its saved state and `disable_adapter()`
are PEFT's own, untouched. Whatever the lean forward does not cover is handed to PEFT's forward on that
call: a merged adapter, another active adapter than at installation, extra arguments (adapter_names for
mixed batches, ...), a base or adapter module replaced by another type, hooks on the layer's submodules or
global module hooks (PEFT's submodule calls would run them). Layers it never covers keep PEFT's forward: LoRA variants (DoRA, ...), subclasses of
`lora.Linear` (quantised bases), bases other than a plain `nn.Linear`, several adapters on one layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from alignfast.trainer.instance_forward import InstanceForward


class _Plan(NamedTuple):
    """When the lean forward applies: the layer's active adapter as it was at installation (its submodules
    are looked up at each call, so a replaced base or adapter module is seen)."""

    active: object          # the layer's _active_adapter when installed (str or list)
    name: str               # the adapter


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _lean_forward(self, x, *args, **kwargs):
    plan: _Plan = self._alignfast_lean
    base = self._modules["base_layer"]
    a = self.lora_A._modules.get(plan.name)
    b = self.lora_B._modules.get(plan.name)
    dropout = self.lora_dropout._modules.get(plan.name)
    if (args or kwargs or self.merged_adapters or self._active_adapter != plan.active
            or type(base) is not nn.Linear or type(a) is not nn.Linear or type(b) is not nn.Linear
            or a.bias is not None or type(dropout) not in (nn.Identity, nn.Dropout) or self.lora_variant
            or _global_hooks() or _has_hooks(base) or _has_hooks(a) or _has_hooks(b) or _has_hooks(dropout)):
        return type(self).forward(self, x, *args, **kwargs)
    if self._disable_adapters:  # PEFT: result = self.base_layer(x)
        return F.linear(x, base.weight, base.bias)
    result = F.linear(x, base.weight, base.bias)
    dtype = result.dtype
    if x.dtype != a.weight.dtype and getattr(self, "cast_input_dtype_enabled", True):  # PEFT's _cast_input_dtype
        x = x.to(dtype=a.weight.dtype)
    if type(dropout) is nn.Dropout:  # nn.Identity (lora_dropout=0) returns x itself: no op to repeat
        x = dropout(x)
    result = result + F.linear(F.linear(x, a.weight, a.bias), b.weight, b.bias) * self.scaling[plan.name]
    return result.to(dtype)


class _LeanForward(InstanceForward):
    """The layer's `forward` attribute."""

    __slots__ = ()

    def __call__(self, x, *args, **kwargs):
        return _lean_forward(self.module, x, *args, **kwargs)


def _plan(layer) -> _Plan | None:
    """The layer's plan, or None where the lean forward would not be PEFT's forward op for op."""
    from peft.tuners.lora import Linear as LoraLinear

    if type(layer) is not LoraLinear or getattr(layer, "lora_variant", None):
        return None
    if type(layer.base_layer) is not nn.Linear or len(layer.lora_A) != 1 or set(layer.lora_A) != set(layer.lora_B):
        return None
    (name,) = tuple(layer.lora_A)
    return _Plan(layer._active_adapter, name)


def install_lean_lora(model: nn.Module) -> int:
    """Give every covered PEFT lora.Linear of `model` the lean forward; returns how many layers got it."""
    n = 0
    for layer in model.modules():
        plan = _plan(layer)
        if plan is None:
            continue
        layer._alignfast_lean = plan
        layer.forward = _LeanForward(layer)
        n += 1
    return n


def remove_lean_lora(model: nn.Module) -> int:
    """Back to PEFT's forward everywhere; returns how many layers had the lean one."""
    n = 0
    for layer in model.modules():
        if "_alignfast_lean" in layer.__dict__:
            del layer.__dict__["_alignfast_lean"]
            layer.__dict__.pop("forward", None)
            n += 1
    return n
