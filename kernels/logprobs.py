"""Triton kernels of alignfast::token_logprobs and its backward (the op's CUDA implementation).

Same math and numerics as the CPU kernels (csrc/cpu/logprobs_rows.h); per row x, z = x / T, target t:

    forward   one program per row, an online pass over the row in BLOCK-wide tiles, M = max x (raw):
              d = (x - M) / T (<= 0 exactly: a tiny T cannot push the max's term above e^0 = 1, as
              x / T - M / T fused into one FMA could), S = sum e^d, S_off = sum_{v != t} e^d, W = sum e^d d
              logprob = -log1p(S_off / e^{d_t})  (t near the max)  else  d_t - log S
              lse = M / T + log S,  entropy = log S - W / S
              rows with a +inf logit, or only -inf logits: torch.log_softmax's results (see alignfast.ops)
              Both kernels launch with enable_fp_fusion=False: lse - x * (1/T) fused into one FMA would not
              round x / T as the forward (and the reference) did, and at T = 1e-9 (|z| ~ 1e9, ulp 256) the
              max's gap would come out as +-256 instead of 0: p = 0 where it is 1.
    backward  a (row, tile) grid: p = e^{-gap}, gap = clamp(lse - z, 0, 1e4),
              dx = (1/T) p (g_ent ((lse - z) - H) - g_lp)   and at the target
              dx_t = (1/T) (g_lp (-expm1(logprob)) + g_ent p_t (-logprob - H))

Launchers take [B, T, V] logits with unit stride over V (any B/T strides), int64 tokens [B, T] and an
optional bool mask [B, T] (the per-row tensors are indexed as flat rows: non-contiguous ones are copied);
under TRITON_INTERPRET=1 they also run on CPU tensors (the tests). Triton launches on the *current* CUDA
device and its stream, so the launchers make the logits' device current for the launch.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

FORWARD_BLOCK = 4096
BACKWARD_BLOCK = 4096


@triton.jit
def _log1p(r):
    """log(1 + r) for r >= 0, accurate for small r (Goldberg: log(u) * r / (u - 1) with u = 1 + r)."""
    u = 1.0 + r
    den = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, r, tl.log(u) * (r / den))


@triton.jit
def _expm1(x):
    """exp(x) - 1 for x <= 0, accurate for small |x| (Kahan: (u - 1) * x / log(u) with u = exp(x))."""
    u = tl.exp(x)
    um1 = u - 1.0
    safe_log = tl.where((u == 1.0) | (u == 0.0), 1.0, tl.log(u))
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, um1 * (x / safe_log)))


@triton.jit
def _scale_in(inv_temp, ACC: tl.constexpr):
    """1/temperature in the accumulation type. It arrives as a float64 argument (annotated: a Python float
    would be passed as float32), so float64 logits are scaled by the exact double."""
    return (tl.full([], 1.0, tl.float64) * inv_temp).to(ACC)


@triton.jit
def _row_offset(row, T, stride_b, stride_t):
    return (row // T) * stride_b + (row % T) * stride_t


@triton.jit
def _forward_kernel(logits_ptr, tokens_ptr, mask_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
                    T, V, stride_b, stride_t, inv_temp: tl.float64,
                    HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    inv_t = _scale_in(inv_temp, ACC)
    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:
            tl.store(logprobs_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            if WITH_ENTROPY:
                tl.store(entropy_ptr + row, 0.0)
            return
    x_row = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    t = tl.load(tokens_ptr + row)
    t = tl.minimum(tl.maximum(t, 0), V - 1)  # ids are checked by the wrapper; never read out of bounds

    M = tl.full([], -float("inf"), ACC)  # running raw max: d = (x - M) / T is <= 0 exactly (see the docstring)
    s_all = tl.full([], 0.0, ACC)
    s_off = tl.full([], 0.0, ACC)
    w = tl.full([], 0.0, ACC)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < V, other=-float("inf")).to(ACC)
        new_M = tl.maximum(M, tl.max(x, axis=0))
        shift = tl.where(M == -float("inf"), 0.0, (M - new_M) * inv_t)
        c = tl.exp(shift)
        M_safe = tl.where(new_M == -float("inf"), 0.0, new_M)
        d = (x - M_safe) * inv_t
        e = tl.exp(d)
        ed = tl.where(e > 0.0, e * d, 0.0)
        w = c * (w + shift * s_all) + tl.sum(ed, axis=0)
        s_all = c * s_all + tl.sum(e, axis=0)
        s_off = c * s_off + tl.sum(tl.where(offs == t, 0.0, e), axis=0)
        M = new_M

    # Rows with a +inf logit (lse +inf; logprob -inf, or NaN for a +inf target; entropy NaN) or only -inf
    # logits (logprob and entropy NaN, lse -inf) are set apart: what torch.log_softmax gives.
    pos_inf = M == float("inf")
    neg_inf = M == -float("inf")
    M_fin = tl.where(pos_inf | neg_inf, 0.0, M)
    x_t = tl.load(x_row + t).to(ACC)
    d_t = (x_t - M_fin) * inv_t
    e_t = tl.exp(d_t)
    s = s_off + e_t
    near = d_t > -20.0
    l1p = _log1p(s_off / tl.where(near, e_t, 1.0))
    log_s = tl.where(near, d_t + l1p, tl.log(s))
    logprob = tl.where(near, -l1p, d_t - log_s)
    logprob = tl.where(pos_inf, tl.where(x_t == float("inf"), float("nan"), -float("inf")),
                       tl.where(neg_inf, float("nan"), logprob))
    lse = tl.where(pos_inf, float("inf"), tl.where(neg_inf, -float("inf"), M_fin * inv_t + log_s))
    tl.store(logprobs_ptr + row, logprob)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(pos_inf | neg_inf, float("nan"), log_s - w / s))


@triton.jit
def _backward_kernel(grad_lp_ptr, grad_ent_ptr, logits_ptr, tokens_ptr, mask_ptr, logprobs_ptr, entropy_ptr,
                     lse_ptr, grad_ptr, T, V, stride_b, stride_t, inv_temp: tl.float64,
                     HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    inv_t = _scale_in(inv_temp, ACC)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < V
    out_row = grad_ptr + row * V
    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:
            tl.store(out_row + offs, tl.zeros((BLOCK,), ACC).to(grad_ptr.dtype.element_ty), mask=inside)
            return
    x_row = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    t = tl.load(tokens_ptr + row)
    lse = tl.load(lse_ptr + row).to(ACC)
    lp = tl.load(logprobs_ptr + row).to(ACC)
    g_lp = tl.load(grad_lp_ptr + row).to(ACC)
    if WITH_ENTROPY:
        g_ent = tl.load(grad_ent_ptr + row).to(ACC)
        ent = tl.load(entropy_ptr + row).to(ACC)
    else:
        g_ent = tl.full([], 0.0, ACC)
        ent = tl.full([], 0.0, ACC)
    z = tl.load(x_row + offs, mask=inside, other=-float("inf")).to(ACC) * inv_t
    # gap = -log p in [0, 1e4]: >= 0 even if lse - z is fused into an FMA or T is tiny (p <= 1), and p = 0
    # (a -inf logit) gives 0, not 0 * inf.
    gap = tl.minimum(tl.maximum(lse - z, 0.0), 1e4)
    p = tl.exp(-gap)
    grad = p * (g_ent * gap - (g_ent * ent + g_lp))
    p_t = tl.exp(lp)
    target = g_lp * -_expm1(lp) + tl.where(p_t > 0.0, g_ent * p_t * (-lp - ent), 0.0)
    grad = tl.where(offs == t, target, grad) * inv_t
    # A row with a +inf logit, or with no finite one (lse = -inf: max/min above dropped the NaN of lse - z), has no
    # distribution and no gradient, as on the CPU and in the reference.
    grad = tl.where((lse == float("inf")) | (lse == -float("inf")), float("nan"), grad)
    tl.store(out_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=inside)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(dtype: torch.dtype):
    """Accumulation type: float32, or float64 for float64 logits."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _on_device_of(t: torch.Tensor):
    """Make t's GPU the current device for a launch (Triton uses the current device and stream, not the
    tensor's); nothing to do for CPU tensors under the interpreter."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """Per-row tensors are read at flat offset b*T + t: contiguous (a no-op for the ops' own calls)."""
    return None if t is None else t.contiguous()


def token_logprobs_cuda(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None, temperature: float,
                        with_entropy: bool):
    """(logprobs [B, T], entropy [B, T] or [0, 0], lse [B, T]) for logits [B, T, V]."""
    B, T, V = logits.shape
    if V > 1 and logits.stride(2) != 1:
        logits = logits.contiguous()
    tokens, mask = _rows(tokens), _rows(mask)
    dtype = _stats_dtype(logits.dtype)
    logprobs = torch.empty((B, T), dtype=dtype, device=logits.device)
    entropy = torch.empty((B, T) if with_entropy else (0, 0), dtype=dtype, device=logits.device)
    lse = torch.empty((B, T), dtype=dtype, device=logits.device)
    N = B * T
    if N == 0:
        return logprobs, entropy, lse
    block = min(FORWARD_BLOCK, triton.next_power_of_2(V))
    with _on_device_of(logits):
        _forward_kernel[(N,)](
            logits, tokens, tokens if mask is None else mask, logprobs, entropy if with_entropy else logprobs, lse,
            T, V, logits.stride(0), logits.stride(1), 1.0 / temperature,
            HAS_MASK=mask is not None, WITH_ENTROPY=with_entropy, BLOCK=block, ACC=_acc(logits.dtype),
            num_warps=8 if block >= 2048 else 4,
            enable_fp_fusion=False,  # x / T and lse round as the reference's (tiny T): see the module docstring
        )
    return logprobs, entropy, lse


def token_logprobs_backward_cuda(grad_logprobs, grad_entropy, logits, tokens, mask, logprobs, entropy, lse,
                                 temperature: float, grad_dtype=None):
    """dlogits [B, T, V] (contiguous, in grad_dtype or the logits' dtype)."""
    B, T, V = logits.shape
    if V > 1 and logits.stride(2) != 1:
        logits = logits.contiguous()
    grad_logprobs, grad_entropy, tokens, mask = _rows(grad_logprobs), _rows(grad_entropy), _rows(tokens), _rows(mask)
    logprobs, entropy, lse = _rows(logprobs), _rows(entropy), _rows(lse)
    grad = torch.empty((B, T, V), dtype=grad_dtype or logits.dtype, device=logits.device)
    N = B * T
    if N == 0:
        return grad
    with_entropy = grad_entropy is not None
    block = min(BACKWARD_BLOCK, triton.next_power_of_2(V))
    with _on_device_of(logits):
        _backward_kernel[(N, triton.cdiv(V, block))](
            grad_logprobs, grad_entropy if with_entropy else grad_logprobs, logits, tokens,
            tokens if mask is None else mask, logprobs, entropy if with_entropy else logprobs, lse, grad,
            T, V, logits.stride(0), logits.stride(1), 1.0 / temperature,
            HAS_MASK=mask is not None, WITH_ENTROPY=with_entropy, BLOCK=block, ACC=_acc(logits.dtype),
            num_warps=8 if block >= 2048 else 4,
            enable_fp_fusion=False,  # x / T and lse round as the reference's (tiny T): see the module docstring
        )
    return grad
