"""KL-shaped rewards, GAE over valid tokens, and whitening: the reference.

For one row b with valid positions t_1 < ... < t_n (mask[b, t] true):

    d_t       = logprobs_t - ref_logprobs_t
    kl_t      = k1: d | k2: d^2 / 2 | k3: exp(-d) - 1 + d | abs: |d|
    rewards_t = -kl_coef * kl_t  (+ scores[b] at t = t_n)
    delta_i   = rewards_{t_i} + gamma * values_{t_{i+1}} - values_{t_i}      (values_{t_{n+1}} := 0)
    A_{t_i}   = delta_i + gamma * lam * A_{t_{i+1}}                          (A_{t_{n+1}} := 0)
    returns_t = A_t + values_t

Masked positions are skipped by the recursion (it carries the next value and advantage across them)
and hold 0 in every output. A row with no valid position is all zeros and ignores its score.
whiten=True: A <- (A - mean) / sqrt(var + 1e-8) with the masked mean and unbiased masked variance
over the whole batch (TRL's masked_whiten); returns use the advantages before whitening.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
WHITEN_EPS = 1e-8


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(-d) + d
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"alignfast: argument 'kl_estimator' must be one of {list(KL_ESTIMATORS)}, got {estimator!r}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask; 0 when the mask is empty."""
    n = mask.sum()
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return torch.where(n > 0, total / n.clamp_min(1), torch.zeros_like(total))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over mask, unbiased variance (0 for fewer than 2 elements); 0 off mask."""
    n = mask.sum()
    mean = masked_mean(x, mask)
    centered = torch.where(mask, x - mean, torch.zeros_like(x))
    sq = (centered * centered).sum()
    var = torch.where(n > 1, sq / (n - 1).clamp_min(1), torch.zeros_like(sq))
    return torch.where(mask, centered * torch.rsqrt(var + eps), torch.zeros_like(x))


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
    """Returns (rewards, advantages, returns, kl), each [B, T], in the promoted dtype of the inputs."""
    mask = mask.bool()
    dtype = torch.promote_types(torch.promote_types(logprobs.dtype, ref_logprobs.dtype), values.dtype)
    if not dtype.is_floating_point or dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    logprobs, ref_logprobs, values = logprobs.to(dtype), ref_logprobs.to(dtype), values.to(dtype)
    scores = scores.to(dtype)
    zeros = torch.zeros_like(logprobs)
    B, T = logprobs.shape

    kl = torch.where(mask, kl_estimate(logprobs, ref_logprobs, kl_estimator), zeros)
    rewards = -kl_coef * kl
    # Last valid index per row; rows with no valid token get no score.
    positions = torch.arange(T, device=mask.device).expand(B, T)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values if T > 0 else torch.full((B,), -1, device=mask.device)
    has_any = last >= 0
    rows = torch.arange(B, device=mask.device)[has_any]
    rewards = rewards.clone()
    rewards[rows, last[has_any]] += scores[has_any]
    rewards = torch.where(mask, rewards, zeros)

    advantages = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=dtype, device=values.device)
    next_adv = torch.zeros(B, dtype=dtype, device=values.device)
    for t in reversed(range(T)):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid, adv, torch.zeros_like(adv))
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv, next_adv)

    returns = torch.where(mask, advantages + values, zeros)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return rewards, advantages, returns, kl
