"""ppo_loss: PPO's clipped policy and value losses, forward and backward fused (Liger-style).

With r = exp(logprobs - old_logprobs), eps = cliprange, eps_v = cliprange_value, mean over valid tokens:

    pg_loss = mean max(-A r, -A clip(r, 1 - eps, 1 + eps))
    vf_loss = 1/2 mean max((v - R)^2, (clip(v, v_old - eps_v, v_old + eps_v) - R)^2)
    loss    = pg_loss + vf_coef * vf_loss

The kernel (csrc/cpu/ppo_loss.cpp, csrc/cuda/ppo_loss.cu) reads every input once and, while it has the
token in registers, also writes the token's gradient of the token *sum* of the losses (d loss / d x
times the number of valid tokens n). Backward is then one multiply: grad_output / n times that. The
gradients agree with autograd of alignfast.reference.ppo_loss: at a tie of the two branches of a max
(every unclipped token: clip(r) == r) each branch gets half, and clip passes the gradient on the open
interval, so a ratio or value exactly on a clip bound counts as clipped (csrc/ppo_loss_math.h says why).

Differentiable with respect to logprobs and values, first order only (the saved per-token gradients
are constants to autograd, as in Liger-Kernel's fused losses). old_logprobs, advantages, old_values
and returns are rollout targets: the wrapper detaches them.
"""

from __future__ import annotations

import torch

from alignfast import reference
from alignfast.ops import _checks
from alignfast.ops._library import define_op, has_kernel, op, use_reference
from alignfast.ops.advantages import output_dtype

NAME = "ppo_loss"
STATS = ("pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approxkl", "ratio")
NUM_VALID = len(STATS)  # stats[NUM_VALID] is the number of valid tokens n (the op's 7th stat)
TENSOR_ARGS = ("logprobs", "old_logprobs", "advantages", "values", "old_values", "returns")

define_op(
    NAME,
    "(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor values, Tensor old_values, "
    "Tensor returns, Tensor mask, float cliprange, float cliprange_value, float vf_coef, bool compute_grad) "
    "-> (Tensor loss, Tensor stats, Tensor grad_logprobs, Tensor grad_values)",
    gpu_impl="cuda",
)
# Outputs: loss 0-d and stats [7] (STATS then n) in output_dtype; grad_logprobs and grad_values [B, T] in the
# inputs' dtype, the per-token gradients of n * loss, or empty [0] tensors when compute_grad is false.
BACKWARD = "ppo_loss_backward"
# The backward's scale, grad_loss / n times the saved per-token gradients, as one op: on CPU a C++ kernel,
# because a torch multiply of a 64 x 1024 batch runs on two threads (ATen's grain is 32768 elements) and on a
# busy machine its barrier waits milliseconds for a descheduled worker (bench/NOTES-threads.md), while the
# kernel keeps small calls on the calling thread; on CUDA the same torch ops (_scale_with_torch). Empty [0]
# for a gradient not asked for.


def _scale_with_torch(grad_loss, stats, grad_logprobs, grad_values, need_logprobs, need_values):
    # The product in the scale's dtype (stats': float32 or float64), rounded once to the gradient's dtype, as the
    # C++ kernel does. A bf16 tensor times a 0-d float32 CUDA tensor rounds the scale to bf16 first (CUDA keeps a
    # scalar in float only when it is a CPU scalar): every gradient off by the same bf16(1/n)/(1/n) - 1, up to 0.4%.
    scale = grad_loss / stats[NUM_VALID].clamp_min(1)

    def scaled(g):
        return (g.to(scale.dtype) * scale).to(g.dtype)

    return (scaled(grad_logprobs) if need_logprobs else grad_logprobs.new_empty(0),
            scaled(grad_values) if need_values else grad_values.new_empty(0))


define_op(
    BACKWARD,
    "(Tensor grad_loss, Tensor stats, Tensor grad_logprobs, Tensor grad_values, bool need_logprobs, "
    "bool need_values) -> (Tensor, Tensor)",
    gpu_impl="torch",
    torch_impl=_scale_with_torch,
    public=False,
)


@torch.library.register_fake(f"alignfast::{NAME}")
def _fake(logprobs, old_logprobs, advantages, values, old_values, returns, mask, cliprange, cliprange_value,
          vf_coef, compute_grad):
    out_dtype = output_dtype(logprobs.dtype)
    grad_shape = logprobs.shape if compute_grad else (0,)
    return (logprobs.new_empty((), dtype=out_dtype), logprobs.new_empty((NUM_VALID + 1,), dtype=out_dtype),
            logprobs.new_empty(grad_shape), values.new_empty(grad_shape))


@torch.library.register_fake(f"alignfast::{BACKWARD}")
def _fake_backward(grad_loss, stats, grad_logprobs, grad_values, need_logprobs, need_values):
    return (grad_logprobs.new_empty(grad_logprobs.shape if need_logprobs else (0,)),
            grad_values.new_empty(grad_values.shape if need_values else (0,)))


def _setup_context(ctx, inputs, output):
    _loss, stats, grad_logprobs, grad_values = output
    ctx.save_for_backward(stats, grad_logprobs, grad_values)
    ctx.mark_non_differentiable(stats, grad_logprobs, grad_values)
    ctx.set_materialize_grads(False)  # backward needs only grad_loss: no [B, T] zeros for the other outputs


def _backward(ctx, grad_loss, _grad_stats, _grad_grad_logprobs, _grad_grad_values):
    stats, grad_logprobs, grad_values = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_loss is None:  # only the (non-differentiable) stats were used downstream
        return (None,) * 11
    if torch.is_grad_enabled() and (needs[0] or needs[3]):
        # backward(create_graph=True): the saved per-token gradients are constants, so a second derivative would
        # silently be 0. Say so instead.
        raise RuntimeError("alignfast.ppo_loss has first derivatives only (its backward is a saved constant), so "
                           "backward(create_graph=True) would give wrong second derivatives; for higher-order "
                           "gradients use alignfast.reference.ppo_loss (or alignfast.ops.force_backend('reference'))")
    if any(needs[i] for i in (1, 2, 4, 5)):
        raise RuntimeError("alignfast.ppo_loss is differentiable with respect to logprobs and values only; "
                           "detach old_logprobs, advantages, old_values and returns")
    if (needs[0] or needs[3]) and grad_logprobs.dim() != 2:
        raise RuntimeError("alignfast.ppo_loss was called with compute_grad=False; call it with compute_grad=True "
                           "to differentiate it")
    scale = op(BACKWARD) if has_kernel(BACKWARD, grad_logprobs.device.type) else _scale_with_torch
    grad_lp, grad_v = scale(grad_loss, stats, grad_logprobs, grad_values, needs[0], needs[3])
    return (grad_lp if needs[0] else None), None, None, (grad_v if needs[3] else None), None, None, None, None, None, \
        None, None


torch.library.register_autograd(f"alignfast::{NAME}", _backward, setup_context=_setup_context)


def _validate(tensors: dict, mask, cliprange, cliprange_value, vf_coef):
    first = tensors["logprobs"]
    _checks.tensor("logprobs", first, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    for name, t in tensors.items():
        if name == "logprobs":
            continue
        _checks.tensor(name, t, ndim=2)
        _checks.same_shape("logprobs", first, name, t)
        _checks.same_device("logprobs", first, name, t)
        if t.dtype != first.dtype:
            _checks.fail(name, f"has dtype {t.dtype} but 'logprobs' has {first.dtype}; cast them to one dtype")
    mask = _checks.mask("mask", mask, "logprobs", first)
    return (mask, _checks.non_negative("cliprange", cliprange), _checks.non_negative("cliprange_value", cliprange_value),
            _checks.non_negative("vf_coef", vf_coef))


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, stats): loss a 0-d float32 tensor (float64 for float64 inputs) differentiable with respect to
    logprobs and values; stats maps pg_loss, vf_loss, clipfrac, vf_clipfrac, approxkl, ratio to detached 0-d
    tensors. All tensor inputs [B, T] in one floating dtype; mask bool (or 0/1 integers). A batch with no
    valid token gives loss 0 and zero gradients.
    """
    tensors = dict(zip(TENSOR_ARGS, (logprobs, old_logprobs, advantages, values, old_values, returns)))
    mask, cliprange, cliprange_value, vf_coef = _validate(tensors, mask, cliprange, cliprange_value, vf_coef)
    out_dtype = output_dtype(logprobs.dtype)
    old_logprobs, advantages, old_values, returns = (t.detach() for t in (old_logprobs, advantages, old_values, returns))
    if use_reference(NAME, logprobs):
        args = [logprobs, old_logprobs, advantages, values, old_values, returns]
        if logprobs.dtype != out_dtype:  # the reference computes in its inputs' dtype; the op in float32
            args = [t.to(out_dtype) for t in args]
        loss, stats = reference.ppo_loss(*args, mask, cliprange=cliprange, cliprange_value=cliprange_value,
                                         vf_coef=vf_coef)
        return loss, {k: stats[k].to(out_dtype) for k in STATS}
    compute_grad = torch.is_grad_enabled() and (logprobs.requires_grad or values.requires_grad)
    loss, stats, _, _ = op(NAME)(logprobs, old_logprobs, advantages, values, old_values, returns, mask,
                                 cliprange, cliprange_value, vf_coef, compute_grad)
    stats = stats.detach().clone()  # not views of the tensor backward saved: a caller may scale its stats in place
    return loss, {k: stats[i] for i, k in enumerate(STATS)}
