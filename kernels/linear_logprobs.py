"""CUDA implementation of alignfast::linear_token_logprobs: cuBLAS for the projection, the Triton
token_logprobs kernels (kernels/logprobs.py) for the vocabulary reductions, one chunk of rows at a time.

    forward   z = hidden[chunk] @ W.T + b in float32 (bf16/fp16 GEMM with float32 output: the products
              are never rounded to bf16), then the fused log-prob/entropy kernel on z.
    backward  z recomputed, dz = the token_logprobs backward kernel on z, written in W's dtype so the
              gradient GEMMs run on tensor cores; dhidden[chunk] = dz @ W (one GEMM over the whole
              vocabulary, rounded once); dW and db accumulate across chunks in float32 and are rounded once.

Masked rows are dropped before any GEMM. Peak extra memory: the chunk's float32 logits and its dz
(plus a float32 dW for bf16/fp16 weights). Under TRITON_INTERPRET=1 the same code runs on CPU tensors
(the GEMMs then upcast to float32 on CPU): that is how it is tested without a GPU.
"""

from __future__ import annotations

import torch

from alignfast.kernels.logprobs import token_logprobs_backward_cuda, token_logprobs_cuda

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b with the product in out_dtype (float32 accumulation and output for bf16/fp16 inputs)."""
    if a.dtype == out_dtype:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=out_dtype)
    return torch.mm(a.to(out_dtype), b.to(out_dtype))  # CPU tensors under the Triton interpreter


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in float32/64, never rounding a @ b to a's dtype first."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _chunk_logits(h, weight, bias, acc):
    z = _mm(h, weight.t(), acc)
    if bias is not None:
        z += bias.to(acc)
    return z


def _valid_rows(mask):
    return None if mask is None else mask.nonzero().squeeze(1)


def _take(t, rows):
    return t if rows is None or t is None else t.index_select(0, rows)


def linear_token_logprobs_cuda(hidden, weight, bias, tokens, mask, temperature: float, with_entropy: bool,
                               chunk_size: int):
    N = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    logprobs = hidden.new_zeros(N, dtype=acc)
    entropy = hidden.new_zeros(N if with_entropy else 0, dtype=acc)
    lse = hidden.new_zeros(N, dtype=acc)
    rows = _valid_rows(mask)
    h, tok = _take(hidden, rows), _take(tokens, rows)
    n = h.shape[0]
    lp_v = hidden.new_empty(n, dtype=acc)
    ent_v = hidden.new_empty(n if with_entropy else 0, dtype=acc)
    lse_v = hidden.new_empty(n, dtype=acc)
    for r0 in range(0, n, chunk_size):
        r1 = min(n, r0 + chunk_size)
        z = _chunk_logits(h[r0:r1], weight, bias, acc)
        lp_c, ent_c, lse_c = token_logprobs_cuda(z.unsqueeze(0), tok[r0:r1].unsqueeze(0), None, temperature,
                                                 with_entropy)
        lp_v[r0:r1] = lp_c[0]
        lse_v[r0:r1] = lse_c[0]
        if with_entropy:
            ent_v[r0:r1] = ent_c[0]
        del z
    if rows is None:
        return lp_v, ent_v, lse_v
    logprobs.index_copy_(0, rows, lp_v)
    lse.index_copy_(0, rows, lse_v)
    if with_entropy:
        entropy.index_copy_(0, rows, ent_v)
    return logprobs, entropy, lse


def linear_token_logprobs_backward_cuda(grad_logprobs, grad_entropy, hidden, weight, bias, tokens, mask, logprobs,
                                        entropy, lse, temperature: float, chunk_size: int, need_hidden: bool,
                                        need_weight: bool, need_bias: bool, weight_grad_out=None):
    acc = _acc_dtype(hidden.dtype)
    need_bias = need_bias and bias is not None
    with_entropy = grad_entropy is not None
    d_hidden = torch.zeros_like(hidden) if need_hidden else hidden.new_empty(0)
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    d_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
    rows = _valid_rows(mask)
    h, tok = _take(hidden, rows), _take(tokens, rows)
    g_lp, lp, ls = _take(grad_logprobs, rows), _take(logprobs, rows), _take(lse, rows)
    g_ent = _take(grad_entropy, rows) if with_entropy else None
    ent = _take(entropy, rows) if with_entropy else None
    n = h.shape[0]
    for r0 in range(0, n, chunk_size):
        r1 = min(n, r0 + chunk_size)
        h_c = h[r0:r1]
        z = _chunk_logits(h_c, weight, bias, acc)
        dz = token_logprobs_backward_cuda(
            g_lp[r0:r1].unsqueeze(0).contiguous(),
            None if g_ent is None else g_ent[r0:r1].unsqueeze(0).contiguous(),
            z.unsqueeze(0), tok[r0:r1].unsqueeze(0).contiguous(), None,
            lp[r0:r1].unsqueeze(0).contiguous(), ent[r0:r1].unsqueeze(0).contiguous() if with_entropy else lp,
            ls[r0:r1].unsqueeze(0).contiguous(), temperature, weight.dtype)[0]
        del z
        if need_bias:
            d_bias += dz.sum(0, dtype=acc)
        if need_hidden:
            dh = torch.mm(dz, weight) if dz.is_cuda or dz.dtype not in _LOW_PRECISION else \
                torch.mm(dz.to(acc), weight.to(acc)).to(hidden.dtype)
            if rows is None:
                d_hidden[r0:r1] = dh
            else:
                d_hidden.index_copy_(0, rows[r0:r1], dh.to(hidden.dtype))
        if need_weight:
            _addmm_(d_weight, dz.t(), h_c)
    d_weight = d_weight.to(weight.dtype) if need_weight else weight.new_empty(0)
    d_bias = d_bias.to(bias.dtype) if need_bias else hidden.new_empty(0)
    if need_weight and weight_grad_out is not None:
        # The schema's out buffer (a CPU allocation-saving path, see alignfast/ops/weight_grad_buffer.py): honoured
        # here with a copy, as the caching allocator already reuses CUDA blocks.
        weight_grad_out.copy_(d_weight)
        d_weight = weight.new_empty(0)
    return d_hidden, d_weight, d_bias
