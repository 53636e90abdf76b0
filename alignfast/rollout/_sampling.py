"""Next-token choice for the batched decode loop: greedy, temperature and top-p (nucleus) sampling.

Reproducibility that does not depend on batching. Every generated row owns a 64-bit key derived from
(seed, the prompt's tokens, which occurrence of that prompt it is, which of the n samples it is); the
uniform variate that row uses at decode step t is a hash of (key, t). So a row draws the same numbers
whether it is decoded alone or beside 500 others, in any order, with or without prompt de-duplication
— unlike one torch.Generator shared by a batch, whose stream is consumed in batch order. The logits
themselves are only batch-independent up to rounding: in fp32/bf16 another batch layout (padding
width, rows per matmul) moves them in the last bits, which flips a draw whose uniform lies that close
to a boundary of the CDF, and the completion diverges from there (rare: at 256 prompts x ~50 tokens
in fp32, one row of 256 differed between two token budgets). In fp64 the tests see exact equality.

Sampling by inverse CDF with that single uniform u per row and step:

    p = softmax(logits / T)                       (fp32)
    top-p: sort p descending; keep token k iff the mass of the tokens before it is < top_p
           (the smallest prefix whose mass reaches top_p; the most likely token is always kept)
    choose the first kept token whose cumulative mass c_k exceeds u * (total kept mass)

which draws token k with probability p_k / (kept mass), the renormalised nucleus distribution.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def row_key(seed: int, prompt, occurrence: int, sample: int) -> int:
    """A 64-bit key for one generated row: a hash of (seed, prompt, occurrence, sample index).

    prompt: token ids, or text (hashed as UTF-8 under its own tag, so text never collides with ids).
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<qqq", seed & 0x7FFFFFFFFFFFFFFF, occurrence, sample))
    if isinstance(prompt, str):
        h.update(b"text:" + prompt.encode("utf-8"))
    else:
        h.update(np.asarray(prompt, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def request_seeds(prompts, seed: int) -> list[int]:
    """One 31-bit seed per prompt for backends that take a seed per request (vLLM, OpenAI-compatible
    servers): a function of (seed, prompt, which occurrence of that prompt), not of its position, so
    reordering or splitting a call does not change a prompt's samples."""
    seen: dict = {}
    out = []
    for p in prompts:
        key = p if isinstance(p, str) else tuple(p)
        occ = seen.get(key, 0)
        seen[key] = occ + 1
        out.append(row_key(seed, p, occ, 0) & 0x7FFFFFFF)
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # uint64 arithmetic wraps modulo 2**64, which is what the mixer wants.
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def step_uniforms(keys: np.ndarray, step: int) -> np.ndarray:
    """Uniform variates in [0, 1) for decode step `step` of the rows with these keys (float32).

    24 bits, so every value is exactly representable in fp32 and strictly below 1.
    """
    with np.errstate(over="ignore"):
        h = _splitmix64(keys.astype(np.uint64) ^ _splitmix64(np.full(keys.shape, step, dtype=np.uint64)))
    return ((h >> np.uint64(40)).astype(np.float64) * (1.0 / (1 << 24))).astype(np.float32)


def choose_tokens(logits: torch.Tensor, *, temperature: float, top_p: float,
                  uniforms: torch.Tensor | None) -> torch.Tensor:
    """Next token per row from last-position logits [R, V]; greedy when temperature == 0.

    uniforms: [R] fp32 in [0, 1) on logits' device (ignored when greedy).
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        cum = probs.cumsum(dim=-1)
        # keep k iff mass before k < top_p; the first token (mass before = 0) is always kept
        probs = probs.masked_fill(cum - probs >= top_p, 0.0)
    else:
        order = None
    cum = probs.cumsum(dim=-1)
    total = cum[:, -1:]
    # u * total < total in exact arithmetic; after rounding keep the target strictly below the top, so
    # the first index whose cumulative mass exceeds it is a token with non-zero probability (trailing
    # zero-mass tokens share the top value and can never be the first to exceed the target).
    target = torch.minimum(uniforms.view(-1, 1).to(cum.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    idx = torch.searchsorted(cum, target, right=True)
    if order is not None:
        idx = order.gather(-1, idx)
    return idx.squeeze(-1)
