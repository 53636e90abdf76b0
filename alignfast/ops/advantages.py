"""compute_advantages: KL-shaped rewards -> GAE over valid tokens -> whitening, fused into one op.

For one row with valid positions t_1 < ... < t_n (mask true), d_t = logprobs_t - ref_logprobs_t:

    kl_t      = k1: d | k2: d^2/2 | k3: exp(-d) - 1 + d | abs: |d|
    rewards_t = -kl_coef * kl_t   (+ scores[b] at t = t_n)
    delta_i   = rewards_{t_i} + gamma * values_{t_{i+1}} - values_{t_i}     (values_{t_{n+1}} := 0)
    A_{t_i}   = delta_i + gamma * lam * A_{t_{i+1}}                         (A_{t_{n+1}} := 0)
    returns_t = A_t + values_t
    whiten:     A <- (A - mean) / sqrt(var + 1e-8), masked mean and unbiased variance over the batch

Masked positions are skipped (the recursion carries the next value and advantage across them) and are
0 in every output; a row with no valid token is all zeros and ignores its score. The spec is
alignfast.reference.compute_advantages; the kernels are csrc/cpu/advantages.cpp (one pass per row,
rows in parallel) and csrc/cuda/advantages.cu (one block per row, chunked parallel scan of the
affine recurrence). The outputs carry no gradient: advantages are targets, computed from detached
rollout quantities, as in TRL and verl.
"""

from __future__ import annotations

import torch

from alignfast import reference
from alignfast.ops import _checks
from alignfast.ops._library import define_op, op, use_reference
from alignfast.reference.advantages import KL_ESTIMATORS

NAME = "compute_advantages"
define_op(
    NAME,
    "(Tensor logprobs, Tensor ref_logprobs, Tensor values, Tensor scores, Tensor mask, float kl_coef, "
    "str kl_estimator, float gamma, float lam, bool whiten) -> (Tensor rewards, Tensor advantages, "
    "Tensor returns, Tensor kl)",
    gpu_impl="cuda",
)


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-token outputs are float32, or float64 when the inputs are (so float64 tests are exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake(f"alignfast::{NAME}")
def _fake(logprobs, ref_logprobs, values, scores, mask, kl_coef, kl_estimator, gamma, lam, whiten):
    out = lambda: logprobs.new_empty(logprobs.shape, dtype=output_dtype(logprobs.dtype))  # noqa: E731
    return out(), out(), out(), out()


def _validate(logprobs, ref_logprobs, values, scores, mask, kl_coef, kl_estimator, gamma, lam, whiten):
    _checks.tensor("logprobs", logprobs, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    for name, t in (("ref_logprobs", ref_logprobs), ("values", values)):
        _checks.tensor(name, t, ndim=2)
        _checks.same_shape("logprobs", logprobs, name, t)
        _checks.same_device("logprobs", logprobs, name, t)
        if t.dtype != logprobs.dtype:
            _checks.fail(name, f"has dtype {t.dtype} but 'logprobs' has {logprobs.dtype}; cast them to one dtype")
    _checks.tensor("scores", scores, ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.same_shape("logprobs", logprobs, "scores", scores, shape=(logprobs.shape[0],))
    _checks.same_device("logprobs", logprobs, "scores", scores)
    mask = _checks.mask("mask", mask, "logprobs", logprobs)
    kl_coef = _checks.non_negative("kl_coef", kl_coef)
    kl_estimator = _checks.choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    gamma = _checks.in_range("gamma", gamma, 0.0, 1.0)
    lam = _checks.in_range("lam", lam, 0.0, 1.0)
    if not isinstance(whiten, bool):
        _checks.fail("whiten", f"must be a bool, got {whiten!r}")
    return mask, kl_coef, kl_estimator, gamma, lam


def compute_advantages(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards, advantages, returns, kl), each [B, T] float32 (float64 for float64 inputs).

    logprobs, ref_logprobs, values: [B, T], one floating dtype; scores: [B]; mask: [B, T] bool (or 0/1
    integers). kl_coef >= 0; kl_estimator in k1, k2, k3, abs; gamma, lam in [0, 1]. No gradient flows.
    """
    mask, kl_coef, kl_estimator, gamma, lam = _validate(
        logprobs, ref_logprobs, values, scores, mask, kl_coef, kl_estimator, gamma, lam, whiten)
    out_dtype = output_dtype(logprobs.dtype)
    logprobs, ref_logprobs, values = logprobs.detach(), ref_logprobs.detach(), values.detach()
    scores = scores.detach().to(out_dtype)
    if use_reference(NAME, logprobs):
        with torch.no_grad():
            outs = reference.compute_advantages(
                logprobs, ref_logprobs, values, scores, mask, kl_coef=kl_coef, kl_estimator=kl_estimator,
                gamma=gamma, lam=lam, whiten=whiten)
        return tuple(o.to(out_dtype) for o in outs)
    return op(NAME)(logprobs, ref_logprobs, values, scores, mask, kl_coef, kl_estimator, gamma, lam, whiten)
