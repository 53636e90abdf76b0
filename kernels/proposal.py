"""Triton kernel of alignfast::propose_token (the op's CUDA implementation).

Same math as csrc/cpu/propose_token.cpp and the spec alignfast/reference/proposal.py. One program per
row walks the row in BLOCK-wide tiles, never holding more than a tile:

    pass 1      max m and min of the finite logits; a NaN logit, or a +inf one when T > 0, ends the row
                here: token -1, logprob NaN, num_allowed 0 (the spec's non-finite rule)
    bisection   (top_p < 1) on the ordered int32 keys of the logits: the smallest key t with
                sum_{key(l) > t} exp((l - m) / tau) < top_p * Z; one masked sum over the row per step,
                at most 32 steps; the nucleus is {key(l) >= t}
    pass 2      allowed set A (finite, in the nucleus, not excluded): count, max m_A, first argmax, and
                W = sum exp((l - m_A) / T)
    pass 3      inverse CDF in index order: running sum across tiles + tl.cumsum inside a tile; the
                first allowed index whose running sum exceeds min(u W, W^-)

Accumulation in float32; float64 logits go to the reference (a float64 GPU sampler is not worth a
second key width). Under TRITON_INTERPRET=1 the launcher also runs on CPU tensors (the tests).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK_MAX = 4096


@triton.jit
def _key(x):
    """Ordered int32 key of float32 values: a < b <=> key(a) < key(b), a == b <=> key(a) == key(b); -0 is keyed as
    +0 (its bits sort one step below, and the spec compares values: tied logits are in or out together)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _propose_kernel(logits_ptr, excl_ptr, u_ptr, tok_ptr, lp_ptr, n_ptr, V, stride_row, inv_tau: tl.float64,
                    top_p: tl.float64, GREEDY: tl.constexpr, USE_TOP_P: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * stride_row
    ex_row = excl_ptr + row * V
    inv_t = (tl.full([], 1.0, tl.float64) * inv_tau).to(tl.float32)
    NEG: tl.constexpr = float("-inf")
    POS: tl.constexpr = float("inf")

    m_vec = tl.full([BLOCK], NEG, tl.float32)
    lo_vec = tl.full([BLOCK], POS, tl.float32)
    nan_vec = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < V, other=NEG).to(tl.float32)
        fin = x > NEG  # False for NaN
        nan_vec = tl.maximum(nan_vec, (x != x).to(tl.int32))
        # NaN kept out of the max explicitly: tl.maximum's NaN handling differs between the GPU and the interpreter
        m_vec = tl.maximum(m_vec, tl.where(fin, x, NEG))
        lo_vec = tl.minimum(lo_vec, tl.where(fin, x, POS))
    m = tl.max(m_vec, 0)
    lo_val = tl.min(lo_vec, 0)
    no_dist = tl.max(nan_vec, 0) > 0
    if not GREEDY:
        no_dist = no_dist | (m == POS)
    if no_dist:  # no distribution (NaN softmax): not an empty allowed set
        tl.store(tok_ptr + row, -1)
        tl.store(lp_ptr + row, float("nan"))
        tl.store(n_ptr + row, 0)
        return
    if m == NEG:
        tl.store(tok_ptr + row, -1)
        tl.store(lp_ptr + row, NEG)
        tl.store(n_ptr + row, 0)
        return

    thr = _key(lo_val).to(tl.int64)
    if USE_TOP_P:
        z_vec = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + offs, mask=offs < V, other=NEG).to(tl.float32)
            z_vec += tl.where(x > NEG, tl.exp((x - m) * inv_t), 0.0)
        limit = (tl.full([], 1.0, tl.float64) * top_p).to(tl.float32) * tl.sum(z_vec, 0)
        hi = _key(m).to(tl.int64)
        # greedy with +inf logits: they carry the softmax's whole mass, the nucleus is them (no bisection)
        lo = tl.where(m == POS, hi - 1, thr - 1)
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            a_vec = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                x = tl.load(x_row + offs, mask=offs < V, other=NEG).to(tl.float32)
                above = (x > NEG) & (_key(x).to(tl.int64) > mid)
                a_vec += tl.where(above, tl.exp((x - m) * inv_t), 0.0)
            if tl.sum(a_vec, 0) < limit:
                hi = mid
            else:
                lo = mid
        thr = hi

    # pass 2: the allowed set's count, max and first argmax
    n_vec = tl.zeros([BLOCK], tl.int64)
    m_a = tl.full([], NEG, tl.float32)
    arg = tl.full([], -1, tl.int64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        x = tl.load(x_row + offs, mask=inb, other=NEG).to(tl.float32)
        ex = tl.load(ex_row + offs, mask=inb, other=1).to(tl.int1)
        ok = (x > NEG) & (ex == 0) & (_key(x).to(tl.int64) >= thr)
        n_vec += ok.to(tl.int64)
        xa = tl.where(ok, x, NEG)
        tile_max = tl.max(xa, 0)
        tile_arg = tl.min(tl.where(ok & (xa == tile_max), offs, V), 0).to(tl.int64)
        better = tile_max > m_a
        arg = tl.where(better, tile_arg, arg)
        m_a = tl.where(better, tile_max, m_a)
    n = tl.sum(n_vec, 0)
    tl.store(n_ptr + row, n)
    if n == 0:
        tl.store(tok_ptr + row, -1)
        tl.store(lp_ptr + row, NEG)
        return
    if GREEDY:
        tl.store(tok_ptr + row, arg)
        tl.store(lp_ptr + row, 0.0)
        return

    w_vec = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        x = tl.load(x_row + offs, mask=inb, other=NEG).to(tl.float32)
        ex = tl.load(ex_row + offs, mask=inb, other=1).to(tl.int1)
        ok = (x > NEG) & (ex == 0) & (_key(x).to(tl.int64) >= thr)
        w_vec += tl.where(ok, tl.exp((x - m_a) * inv_t), 0.0)
    W = tl.sum(w_vec, 0)
    # W >= 1 (the maximal allowed token weighs exp(0)); the float just below it is its bit pattern - 1
    w_below = (W.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True)
    target = tl.minimum(tl.load(u_ptr + row) * W, w_below)

    cum = tl.full([], 0.0, tl.float32)
    chosen = tl.full([], V, tl.int64)
    last = arg
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        x = tl.load(x_row + offs, mask=inb, other=NEG).to(tl.float32)
        ex = tl.load(ex_row + offs, mask=inb, other=1).to(tl.int1)
        ok = (x > NEG) & (ex == 0) & (_key(x).to(tl.int64) >= thr)
        w = tl.where(ok, tl.exp((x - m_a) * inv_t), 0.0)
        c = cum + tl.cumsum(w, 0)
        hit = ok & (c > target)
        first = tl.min(tl.where(hit, offs, V), 0).to(tl.int64)
        chosen = tl.minimum(chosen, first)
        last = tl.maximum(last, tl.max(tl.where(w > 0, offs, -1), 0).to(tl.int64))
        cum += tl.sum(w, 0)
    chosen = tl.where(chosen == V, last, chosen)  # the running sum fell short of the target by rounding
    x_c = tl.load(x_row + chosen).to(tl.float32)
    tl.store(tok_ptr + row, chosen)
    tl.store(lp_ptr + row, (x_c - m_a) * inv_t - tl.log(W))


def _on_device_of(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def propose_token_triton(logits: torch.Tensor, excluded: torch.Tensor, uniforms: torch.Tensor, temperature: float,
                         top_p: float):
    """(tokens [B] int64, logprobs [B] float32, num_allowed [B] int64) for logits [B, V]."""
    if logits.dtype == torch.float64:
        from alignfast.reference import propose_token

        return propose_token(logits, excluded, uniforms, temperature=temperature, top_p=top_p)
    B, V = logits.shape
    logits = logits.contiguous()
    excluded = excluded.contiguous()
    uniforms = uniforms.float().contiguous()
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    num_allowed = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return tokens, logprobs, num_allowed
    greedy = temperature == 0.0
    block = min(BLOCK_MAX, triton.next_power_of_2(V))
    with _on_device_of(logits):
        _propose_kernel[(B,)](logits, excluded.view(torch.uint8), uniforms, tokens, logprobs, num_allowed, V,
                              logits.stride(0), 1.0 / (1.0 if greedy else temperature), float(top_p),
                              GREEDY=greedy, USE_TOP_P=top_p < 1.0, BLOCK=block,
                              num_warps=8 if block >= 2048 else 4)
    return tokens, logprobs, num_allowed
