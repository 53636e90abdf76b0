"""Per-token log-probabilities and entropy of sampled tokens: the reference.

With z = logits / temperature over the last (vocabulary) axis:

    logprob = z[token] - logsumexp(z)
    entropy = logsumexp(z) - sum_v softmax(z)_v * z_v       (terms with z_v = -inf contribute 0)

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
        # Masked rows are not computed at all (their token ids may be arbitrary padding).
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
    p = torch.softmax(z, dim=-1)
    # p * z with 0 * -inf := 0. z is replaced before the product (not after): a where() around p * z
    # would still send 0 * -inf = NaN into the gradient of p.
    pz = p * torch.where(p > 0, z, torch.zeros_like(z))
    entropy = lse - pz.sum(dim=-1)
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
