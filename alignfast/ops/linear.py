"""linear: y = x W^T + b with its float32 CPU GEMMs on the library `alignfast.ops.cpu_gemm` chose.

    forward   y = x W^T + b                     x: [..., in], W: [out, in], b: [out]
    backward  dx = dy W,  dW = dy^T x,  db = sum_rows dy   (x and dy flattened to [M, in] and [M, out])

Each product is one `alignfast::mm(a, b, bias)` call (a @ b + bias, csrc/cpu/gemm.cpp), with transposed operands
passed as views: no copy, and dW comes out as [out, in], W's own layout. This is what F.linear computes, the
GEMMs excepted: where the choice is oneDNN (AMD CPUs with AVX-512) they run 1.8-2.3x faster at a 135M model's
shapes and round differently, by float32 rounding (the K products summed in another order). Everything that would
gain nothing (float64, bfloat16, CUDA, autocast, the reference backend, no extension, and GEMMs under
cpu_gemm.min_macs_per_thread per thread) calls F.linear itself. oneDNN gets the token dimension as row counts
from a fixed grid (one or two calls per product; dW's summed tokens in blocks of 4096 ... 64, the rest on ATen):
it compiles and keeps a primitive per shape, and a run's micro-batches each bring a new token count
(csrc/cpu/gemm.cpp).

`route_linear()` gives a TorchFunctionMode (RouteLinear) that sends each F.linear inside it here: the fast
trainer enters it around the full-sequence forwards of the policy, the reference policy and the critic
(trainer/policy.py), so a Hugging Face model's nn.Linear layers and PEFT's LoRA layers use it with no change to
the model.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from alignfast.ops import _checks, cpu_gemm
from alignfast.ops._library import define_op, op, use_reference

NAME = "mm"


def _torch_mm(a, b, bias=None):
    out = a @ b
    return out + bias if bias is not None else out


define_op(NAME, "(Tensor a, Tensor b, Tensor? bias=None) -> Tensor", gpu_impl="torch", torch_impl=_torch_mm,
          public=False)


@torch.library.register_fake(f"alignfast::{NAME}")
def _fake(a, b, bias=None):
    return a.new_empty((a.shape[0], b.shape[1]))


def _setup_context(ctx, inputs, output):
    a, b, bias = inputs
    need_a, need_b = ctx.needs_input_grad[:2]
    # As ATen's mm: each operand is kept only for the other's gradient (a frozen b keeps no activation alive).
    ctx.save_for_backward(a if need_b else None, b if need_a else None)
    ctx.with_bias = bias is not None


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[:2]
    need_bias = len(ctx.needs_input_grad) > 2 and ctx.needs_input_grad[2]
    mm = op(NAME)
    da = mm(grad, b.t()) if need_a else None
    db = mm(a.t(), grad) if need_b else None
    dbias = grad.sum(0) if need_bias and ctx.with_bias else None
    return da, db, dbias


torch.library.register_autograd(f"alignfast::{NAME}", _backward, setup_context=_setup_context)


def routes_here(x, weight) -> bool:
    """Whether `linear` runs alignfast's GEMMs for these operands: float32 tensors on the CPU, the extension
    loaded, no CPU autocast (under autocast F.linear runs in the autocast dtype, which this path would skip), and
    a forward GEMM large enough for oneDNN (cpu_gemm.worth_onednn): a smaller one would run ATen's GEMM either
    way, and F.linear's C++ path costs less than this one's Python."""
    return (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32 and weight.dim() == 2 and x.dim() >= 1
            and not torch.is_autocast_enabled("cpu") and cpu_gemm.worth_onednn(x.numel() * weight.shape[0])
            and not use_reference(NAME, x))


class _Linear(torch.autograd.Function):
    """y = x W^T + b on 2-D x; the backward's products as in the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        need_x, need_w = ctx.needs_input_grad[:2]
        # What F.linear keeps: x only for dW, W only for dx (LoRA's frozen base keeps no activation for dW).
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        ctx.with_bias = bias is not None
        return op(NAME)(x, weight.t(), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        mm = op(NAME)
        grad = grad.contiguous()
        dx = mm(grad, weight) if need_x else None
        dw = mm(grad.t(), x) if need_w else None
        db = grad.sum(0) if need_b and ctx.with_bias else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), its float32 CPU GEMMs (forward and backward) on cpu_gemm's library."""
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    # Mixed dtypes are F.linear's error (its message names neither argument), except under autocast, which casts
    autocast = torch.is_autocast_enabled(x.device.type)
    if weight.dtype != x.dtype and not autocast:
        _checks.fail("weight", f"must have x's dtype ({x.dtype}), got {weight.dtype}")
    if x.shape[-1] != weight.shape[1]:
        _checks.fail("weight", f"must be [out, {x.shape[-1]}] for x of shape {tuple(x.shape)}, got "
                     f"{tuple(weight.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            _checks.fail("bias", f"must be [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != x.dtype and not autocast:
            _checks.fail("bias", f"must have x's dtype ({x.dtype}), got {bias.dtype}")
    if not routes_here(x, weight) or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, weight, bias)
    return _routed_linear(x, weight, bias)


def _routed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear` once its checks and routes_here have passed (RouteLinear calls it directly: F.linear's own call
    has the shapes checked already, and the routing test would run twice per layer)."""
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    return _Linear.apply(x2, weight, bias).reshape(*x.shape[:-1], weight.shape[0])


class RouteLinear(TorchFunctionMode):
    """Inside: F.linear calls go to `linear` (only F.linear; every other function passes through)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (routes_here(x, weight) and x.shape[-1] == weight.shape[1]
                    and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype == torch.float32))):
                return _routed_linear(x, weight, bias)
        return func(*args, **kwargs)


def hf_checkpointing(model: torch.nn.Module | None) -> bool:
    """Whether some module of `model` has Hugging Face's gradient checkpointing on and is in training mode: its
    backward recomputes the layer outside any block entered around the forward, with plain F.linear, whose saved
    tensors differ from ours (torch's non-reentrant checkpoint then raises CheckpointError)."""
    return model is not None and any(getattr(m, "gradient_checkpointing", False) is True and m.training
                                     for m in model.modules())


def route_linear(model: torch.nn.Module | None = None):
    """RouteLinear() where the process's CPU GEMMs are oneDNN's, else a no-op context (ATen's GEMMs are what
    F.linear runs already). With `model`: also a no-op while `model` checkpoints its layers (hf_checkpointing)."""
    if cpu_gemm.current() != "onednn" or hf_checkpointing(model):
        return contextlib.nullcontext()
    return RouteLinear()
