"""Per-token log-probabilities and entropy of sampled tokens: the reference.

With z = logits / temperature over the last (vocabulary) axis:

    logprob = z[token] - logsumexp(z)
    entropy = -sum_v softmax(z)_v * (z_v - logsumexp(z))    (terms with z_v = -inf contribute 0)

Its absolute error is that of z - logsumexp(z), a few ulps of max |z|: a confident row's tiny entropy keeps
fewer digits (V = 151936, one logit 36 above the rest, entropy 4.5e-9: 7e-7 of it in float64). The fused kernels
do better there (the top token's log p as -log1p of the others' sum): a float64 test of them must allow the
reference that absolute error.

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
    # p = exp(z - lse), not softmax(z): the same numbers, and torch.compile fuses the whole entropy into one pass
    # over the row, where it kept softmax's [N, V] output (the benchmarks' compiled baseline was 4x slower for it).
    # p * log p with 0 * -inf := 0. log p is replaced before the product (not after): a where() around the
    # product would still send 0 * -inf = NaN into the gradient of p.
    log_p = z - lse.unsqueeze(-1)
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(dim=-1)
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
