"""PPO losses: the reference (TRL's PPO trainer, written out).

    ratio      = exp(logprobs - old_logprobs)
    pg_loss    = mean_valid max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
    v_clipped  = clip(values, old_values - eps_v, old_values + eps_v)
    vf_loss    = 1/2 * mean_valid max((values - R)^2, (v_clipped - R)^2)
    loss       = pg_loss + vf_coef * vf_loss
    clipfrac   = mean_valid [-A * clip(ratio) > -A * ratio]
    vf_clipfrac= mean_valid [(v_clipped - R)^2 > (values - R)^2]
    approxkl   = 1/2 * mean_valid (logprobs - old_logprobs)^2
    ratio      = mean_valid ratio

mean_valid is the token mean over mask (0 when nothing is valid). Stats are detached 0-d tensors.
"""

from __future__ import annotations

import torch

from alignfast.reference.advantages import masked_mean
from alignfast.reference.logprobs import token_logprobs


def _policy_terms(logprobs, old_logprobs, advantages, mask, cliprange):
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.maximum(pg1, pg2), mask)
    stats = {
        "pg_loss": pg_loss.detach(),
        "clipfrac": masked_mean((pg2 > pg1).to(logprobs.dtype), mask).detach(),
        "approxkl": (0.5 * masked_mean(log_ratio * log_ratio, mask)).detach(),
        "ratio": masked_mean(ratio, mask).detach(),
    }
    return pg_loss, stats


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
):
    """All [B, T]. Returns (loss, stats) with stats keys pg_loss, vf_loss, clipfrac, vf_clipfrac, approxkl, ratio."""
    mask = mask.bool()
    # Masked tokens are not computed: their inputs are replaced by zeros first, so that garbage there (NaN, inf)
    # reaches neither the loss nor, through 0 * NaN in a backward, the gradients.
    values, old_values, returns = (torch.where(mask, x, torch.zeros_like(x)) for x in (values, old_values, returns))
    pg_loss, stats = _policy_terms(logprobs, old_logprobs, advantages, mask, cliprange)
    v_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf1 = (values - returns) ** 2
    vf2 = (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.maximum(vf1, vf2), mask)
    loss = pg_loss + vf_coef * vf_loss
    stats["vf_loss"] = vf_loss.detach()
    stats["vf_clipfrac"] = masked_mean((vf2 > vf1).to(values.dtype), mask).detach()
    return loss, stats


def ppo_policy_loss_from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    cliprange: float = 0.2,
    entropy_coef: float = 0.0,
):
    """The clipped surrogate from logits: loss = pg_loss - entropy_coef * mean_valid(entropy).

    Returns (loss, stats) with stats keys pg_loss, entropy, clipfrac, approxkl, ratio.
    """
    mask = mask.bool()
    logprobs, entropy = token_logprobs(logits, tokens, temperature=temperature, mask=mask, return_entropy=True)
    dtype = logprobs.dtype
    pg_loss, stats = _policy_terms(logprobs, old_logprobs.to(dtype), advantages.to(dtype), mask, cliprange)
    mean_entropy = masked_mean(entropy, mask)
    loss = pg_loss - entropy_coef * mean_entropy
    stats["entropy"] = mean_entropy.detach()
    return loss, stats
