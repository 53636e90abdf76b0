"""Per-token log-probabilities and entropy of sampled tokens: the reference.

With z = logits / temperature over the last (vocabulary) axis:

    logprob = z[token] - logsumexp(z)
    entropy = logsumexp(z) - sum_v softmax(z)_v * z_v       (terms with z_v = -inf contribute 0)

It is computed as log s - sum_v e_v d_v / s with d = z - max z, e = exp d, s = sum e (the same value), which keeps
a confident row's tiny entropy to 3e-8 of itself in float64 (V = 151936, one logit 36 above the rest, entropy
4.5e-9; logsumexp(z) - sum softmax(z) z lost 9e-4 of it to the difference of two numbers near 36). The fused
kernels, which take log1p of the others' sum, keep it to 1e-12.

A token whose logit is -inf gets logprob -inf. Masked positions are 0 in both outputs and get
no gradient. The linear variant computes the same from hidden states: z = (hidden @ weight.T + bias) / T.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
):
    """logits [..., V], tokens [...] -> logprobs [...] (float32, or float64 for float64 logits)."""
    z = logits.to(_compute_dtype(logits.dtype)) / temperature
    if mask is not None:
        mask = mask.bool()
        # Masked rows' outputs are 0 and their token ids are not read (they may be arbitrary padding). Their logits
        # are still reduced, as TRL's code does: a masked row of non-finite logits (NaN, +inf, all -inf) gets a NaN
        # gradient (logsumexp's backward is 0 * softmax there). Replacing them first would cost one more [N, V] pass
        # (1.5x the eager forward at [16, 64, 49152]: 352 vs 228 ms); the fused kernels skip masked rows and give 0.
        safe_tokens = torch.where(mask, tokens, torch.zeros_like(tokens))
    else:
        safe_tokens = tokens
    lse = torch.logsumexp(z, dim=-1)
    picked = torch.gather(z, -1, safe_tokens.long().unsqueeze(-1)).squeeze(-1)
    logprobs = picked - lse
    if mask is not None:
        logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    if not return_entropy:
        return logprobs
    # -sum p log p as log s - sum e d / s, with d = z - max z (detached: the value does not depend on it), e = exp d,
    # s = sum e: small numbers near the top token, so a tiny temperature (z ~ 1e9) keeps its digits, and one pass
    # that torch.compile fuses (softmax's [N, V] output made the compiled baseline 4x slower in the forward).
    # e * d with 0 * -inf := 0. d is replaced before the product (not after): a where() around e * d would still
    # send 0 * -inf = NaN into the gradient of e.
    d = z - z.detach().amax(dim=-1, keepdim=True)
    e = d.exp()
    s = e.sum(dim=-1)
    entropy = s.log() - (e * torch.where(e > 0, d, torch.zeros_like(d))).sum(dim=-1) / s
    if mask is not None:
        entropy = torch.where(mask, entropy, torch.zeros_like(entropy))
    return logprobs, entropy


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
):
    """hidden [..., H], weight [V, H] (bias [V]) -> token_logprobs(hidden @ weight.T + bias, ...)."""
    dtype = _compute_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return token_logprobs(logits, tokens, temperature=temperature, mask=mask, return_entropy=return_entropy)
