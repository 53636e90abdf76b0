"""Per-token log-probs (and entropy) straight from the last hidden states, never holding [N, V] logits.

    linear_token_logprobs(hidden, weight, tokens, bias=b, ...) == token_logprobs(hidden @ weight.T + b, tokens, ...)

The logits are computed a piece at a time, at most chunk_size x V of them live at once (float32
accumulation and output): each piece is reduced by the fused log-prob kernel to per-row stats (logprob,
entropy, logsumexp) and dropped. The backward recomputes each piece, turns it into dlogits with the saved
stats, and accumulates dhidden, dweight and dbias. A backward with create_graph=True (second derivatives)
differentiates the reference instead. Masked rows are dropped before any GEMM.

How the chunk_size x V budget is shaped: on CUDA as chunk_size rows x V (dweight/dbias accumulated in
float32, rounded once). On CPU as vocabulary tiles over all rows, [N, chunk_size * V / N] (rows split only
when a tile would be narrower than 128 columns): tall GEMMs, and dweight written once per tile instead of
accumulated per row chunk; the per-row stats of the tiles are merged exactly. bfloat16 inputs multiply as
bf16 x bf16 -> float32 on oneDNN's brgemm where the CPU has AVX512_BF16 and oneDNN is the chosen CPU GEMM
library (ops/cpu_gemm.py: the float32 logits of the float32 path, with dlogits rounded to bf16 for the dhidden
and dweight products as eager's bf16 autograd does); elsewhere bfloat16/float16 inputs run their GEMMs in
float32 (hidden converted once, W a tile at a time; csrc/cpu/linear_token_logprobs.cpp).

Determinism: a call gives the same bits every time with the same thread count. On CPU the tile width follows
at::get_num_threads(), so another thread count sums the logits in other groupings: results then differ at float
rounding (measured: ~2e-6 relative in float32, one bf16 ulp in bfloat16 dhidden), never more.

Chunk size (rows' worth of logits per piece, overridable with chunk_size=): the piece's float32 logits are kept to
1/16 of the size the materialised logits would have in the input's dtype, so that with the backward's
dlogits buffer the extra memory stays within 1/8 of them (on CPU 1/32 for bfloat16/float16, whose float32
dhidden and W tile (or packed bf16 operands) take the rest); at least 64 rows per chunk on CUDA (GEMM efficiency
of row chunks; on CPU a batch of at most 64 rows is one piece) and at most 1 GiB of float32 logits. Kernels: C++ on CPU (csrc/cpu/linear_token_logprobs.cpp); on CUDA
cuBLAS + the Triton token_logprobs kernels (kernels/linear_logprobs.py).
"""

from __future__ import annotations

import math

import torch

from alignfast import reference
from alignfast.ops import _checks, weight_grad_buffer
from alignfast.ops._library import define_op, op, use_reference
from alignfast.ops.token_logprobs import check_token_ids, stats_dtype

NAME = "linear_token_logprobs"
BACKWARD = "linear_token_logprobs_backward"

MIN_CHUNK_ROWS = 64
MAX_CHUNK_BYTES = 1 << 30

define_op(
    NAME,
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor tokens, Tensor? mask, float temperature, bool with_entropy, "
    "int chunk_size) -> (Tensor, Tensor, Tensor)",
    gpu_impl="triton",
    triton="linear_logprobs:linear_token_logprobs_cuda",
)
define_op(
    BACKWARD,
    "(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, Tensor tokens, "
    "Tensor? mask, Tensor logprobs, Tensor entropy, Tensor lse, float temperature, int chunk_size, bool need_hidden, "
    "bool need_weight, bool need_bias, Tensor(a!)? weight_grad_out=None) -> (Tensor, Tensor, Tensor)",
    gpu_impl="triton",
    triton="linear_logprobs:linear_token_logprobs_backward_cuda",
    public=False,
)


def default_chunk_size(N: int, V: int, dtype: torch.dtype, min_rows: int = MIN_CHUNK_ROWS, share: int = 16) -> int:
    """Rows per chunk: float32 chunk logits <= 1/share of the materialised logits, within [min_rows, 1 GiB]."""
    elt = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    rows = math.ceil(N * elt / (share * acc))
    rows = min(rows, max(1, MAX_CHUNK_BYTES // (V * acc)))
    return max(1, min(N, max(min_rows, rows)))


@torch.library.register_fake(f"alignfast::{NAME}")
def _fake(hidden, weight, bias, tokens, mask, temperature, with_entropy, chunk_size):
    N = hidden.shape[0]
    dtype = stats_dtype(hidden.dtype)
    return (hidden.new_empty(N, dtype=dtype), hidden.new_empty(N if with_entropy else 0, dtype=dtype),
            hidden.new_empty(N, dtype=dtype))


@torch.library.register_fake(f"alignfast::{BACKWARD}")
def _fake_backward(grad_logprobs, grad_entropy, hidden, weight, bias, tokens, mask, logprobs, entropy, lse,
                   temperature, chunk_size, need_hidden, need_weight, need_bias, weight_grad_out=None):
    d_hidden = hidden.new_empty(hidden.shape if need_hidden else (0,))
    d_weight = weight.new_empty(weight.shape if need_weight and weight_grad_out is None else (0,))
    d_bias = hidden.new_empty(bias.shape if (need_bias and bias is not None) else (0,))
    return d_hidden, d_weight, d_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, tokens, mask, temperature, with_entropy, chunk_size = inputs
    logprobs, entropy, lse = output
    # The caller gets logprobs and entropy and may edit them in place: private copies ([N], small) keep backward
    # working as it does on the reference path.
    ctx.save_for_backward(hidden, weight, bias, tokens, mask, logprobs.clone(), entropy.clone(), lse)
    ctx.temperature, ctx.with_entropy, ctx.chunk_size = temperature, with_entropy, chunk_size


def _backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, bias, tokens, mask, logprobs, entropy, lse = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if not (need_hidden or need_weight or need_bias):
        return (None,) * 8
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(logprobs)
    if not ctx.with_entropy:
        grad_entropy = None
    if torch.is_grad_enabled():
        # backward(create_graph=True): the kernel's gradients would be constants to autograd (second derivatives
        # silently 0); differentiate the reference instead (it materialises [N, V]; a rare path).
        return (*_grads_through_reference(hidden, weight, bias, tokens, mask, ctx.temperature, grad_logprobs,
                                          grad_entropy, (need_hidden, need_weight, need_bias and bias is not None)),
                None, None, None, None, None)
    # A weight registered with a WeightGradBuffer (the trainers' CPU LM heads) gets dW written into that buffer
    # when no earlier gradient still uses it, instead of a fresh [V, H] block per call (weight_grad_buffer.py).
    lent = weight_grad_buffer.lend(weight) if need_weight else None
    d_hidden, d_weight, d_bias = op(BACKWARD)(
        grad_logprobs.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(), hidden, weight, bias,
        tokens, mask, logprobs, entropy, lse, ctx.temperature, ctx.chunk_size, need_hidden, need_weight,
        bool(need_bias and bias is not None), lent)
    if lent is not None:
        d_weight = lent
    return (d_hidden if need_hidden else None, d_weight if need_weight else None,
            d_bias if (need_bias and bias is not None) else None, None, None, None, None, None)


def _grads_through_reference(hidden, weight, bias, tokens, mask, temperature, grad_logprobs, grad_entropy, needs):
    """(dhidden, dweight, dbias) of sum g_lp * logprob + g_ent * entropy, with create_graph=True, from the
    reference; None where not needed."""
    with torch.enable_grad():
        inputs = [t if t is None or t.requires_grad else t.detach().requires_grad_() for t in (hidden, weight, bias)]
        lp, ent = reference.linear_token_logprobs(inputs[0], inputs[1], tokens, bias=inputs[2],
                                                  temperature=temperature, mask=mask, return_entropy=True)
        outs, grads = [lp], [grad_logprobs.to(lp.dtype)]
        if grad_entropy is not None:
            outs.append(ent)
            grads.append(grad_entropy.to(ent.dtype))
        wanted = [t for t, need in zip(inputs, needs) if need]
        got = iter(torch.autograd.grad(outs, wanted, grads, create_graph=True, allow_unused=True))
    out = []
    for t, need in zip(inputs, needs):
        g = next(got) if need else None
        out.append(None if g is None else g.to(t.dtype))
    return out


torch.library.register_autograd(f"alignfast::{NAME}", _backward, setup_context=_setup_context)


def _check(hidden, weight, tokens, bias, mask, temperature, chunk_size):
    _checks.tensor("hidden", hidden, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,))
    if weight.shape[1] != hidden.shape[-1]:
        _checks.fail("weight", f"has shape {tuple(weight.shape)} but hidden's last dimension is {hidden.shape[-1]}")
    if weight.shape[0] < 1:
        _checks.fail("weight", "needs at least one vocabulary row")
    if hidden.shape[-1] < 1:
        _checks.fail("hidden", f"needs a hidden size (last dimension) of at least 1, got shape {tuple(hidden.shape)}")
    _checks.same_device("hidden", hidden, "weight", weight)
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=(hidden.dtype,))
        _checks.same_shape("weight's rows", weight, "bias", bias, shape=weight.shape[:1])
        _checks.same_device("hidden", hidden, "bias", bias)
    _checks.tensor("tokens", tokens)
    _checks.same_shape("hidden's leading dims", hidden, "tokens", tokens, shape=hidden.shape[:-1])
    _checks.same_device("hidden", hidden, "tokens", tokens)
    temperature = _checks.temperature("temperature", temperature)
    if mask is not None:
        mask = _checks.mask("mask", mask, "tokens", tokens)
    check_token_ids(tokens, weight.shape[0], mask)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        _checks.fail("chunk_size", f"must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    return mask, temperature


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
):
    """hidden [..., H], weight [V, H] (bias [V]), tokens [...] -> float32 logprobs [...] (and entropy).

    The same as token_logprobs(hidden @ weight.T + bias, tokens, ...), computed chunk by chunk without
    the [N, V] logits; differentiable w.r.t. hidden, weight and bias (gradients in their dtype).
    chunk_size: at most chunk_size x V logits live at once (default and layout: see the module docstring).
    """
    mask, temperature = _check(hidden, weight, tokens, bias, mask, temperature, chunk_size)
    if use_reference(NAME, hidden):
        return reference.linear_token_logprobs(hidden, weight, tokens, bias=bias, temperature=temperature, mask=mask,
                                               return_entropy=return_entropy)
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H).contiguous()
    N = h.shape[0]
    # The 64-row floor is for row chunks' GEMM efficiency (CUDA). CPU tiles span all rows whatever the budget:
    # there a batch of at most 64 rows is still one piece (small, and its per-row results then do not depend
    # on how a batch is split into micro-batches: the trainer's parity tests), larger ones get the budget.
    # On CPU, low-precision inputs also hold float32 copies of hidden and of dhidden (4H/V of the bf16 logits)
    # and a float32 W tile per worker: their logits get 1/32 of the logits instead of 1/16.
    cpu_low = not hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16)
    chunk = chunk_size or default_chunk_size(N, weight.shape[0], hidden.dtype,
                                             min_rows=MIN_CHUNK_ROWS if hidden.is_cuda or N <= MIN_CHUNK_ROWS else 1,
                                             share=32 if cpu_low else 16)
    tok = tokens.reshape(N).to(torch.int64).contiguous()
    m = None if mask is None else mask.reshape(N).contiguous()
    logprobs, entropy, _lse = op(NAME)(h, weight, bias, tok, m, temperature, return_entropy, chunk)
    shape = tokens.shape
    if return_entropy:
        return logprobs.view(shape), entropy.view(shape)
    return logprobs.view(shape)
