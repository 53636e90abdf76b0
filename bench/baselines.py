"""Baselines for bench_advantages: KL-shaped rewards + GAE + whitening as TRL and verl write them.

Re-implemented from reading the sources (nothing copied), keeping what costs time: a Python loop over
the T positions with a handful of [B]-sized tensor ops per step, the same elementwise work around it,
and the host syncs their whitening does. Only the response mask convention differs between them:

* TRL, `PPOTrainer.train` in trl/trainer/ppo_trainer.py (v0.12+), steps "4. compute rewards" and
  "6. compute advantages and returns", with `masked_mean` / `masked_var` / `masked_whiten` from
  trl/trainer/utils.py (trl/core.py in older releases). Responses are right-padded: padded logprobs
  hold INVALID_LOGPROB (1.0) and padded values 0, so the loop runs over every position and padding
  contributes zeros. Agrees with alignfast.reference for right-padded masks.
* verl, `compute_gae_advantage_return` in verl/trainer/ppo/core_algos.py (the version that "skips values
  and TD-error on observation tokens") after `apply_kl_penalty` in verl/trainer/ppo/ray_trainer.py, with
  `masked_whiten` from verl/utils/torch_functional.py. The response mask is a float tensor and masked
  positions carry the next value and advantage, so it agrees with alignfast.reference for any mask.
"""

from __future__ import annotations

import torch

INVALID_LOGPROB = 1.0  # TRL's fill value for padded logprobs


def _last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values


def _masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _masked_var(values, mask):
    mean = _masked_mean(values, mask)
    variance = _masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    if mask_sum == 0:  # both libraries check this on the host: a device sync per call
        raise ValueError("masked_var: the mask is empty")
    return variance * (mask_sum / (mask_sum - 1))


def masked_whiten(values, mask):
    mean, var = _masked_mean(values, mask), _masked_var(values, mask)
    return (values - mean) * torch.rsqrt(var + 1e-8)


@torch.no_grad()
def trl_advantages(logprobs, ref_logprobs, values, scores, mask, *, kl_coef, gamma=1.0, lam=0.95):
    """TRL's loop (k1 KL). Returns (rewards, advantages, returns, kl) like alignfast.ops.compute_advantages."""
    padding_mask = ~mask
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    values = torch.masked_fill(values, padding_mask, 0)
    logr = ref_logprobs - logprobs
    kl = -logr
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    actual_end = _last_valid_index(mask)
    rewards[(actual_start, actual_end)] += scores  # TRL indexes with a list; a tuple is the same index

    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return rewards, advantages, returns, kl


@torch.no_grad()
def verl_advantages(logprobs, ref_logprobs, values, scores, mask, *, kl_coef, gamma=1.0, lam=0.95):
    """verl's loop (k1 KL, "kl" penalty). Returns (rewards, advantages, returns, kl)."""
    response_mask = mask.to(values.dtype)
    # the reward manager puts each sequence's score on its last valid token
    token_level_scores = torch.zeros_like(values)
    token_level_scores[torch.arange(values.shape[0], device=values.device), _last_valid_index(mask)] = scores
    kld = (logprobs - ref_logprobs) * response_mask
    token_level_rewards = token_level_scores - kl_coef * kld

    nextvalues = 0
    lastgaelam = 0
    advantages_reversed = []
    gen_len = token_level_rewards.shape[-1]
    for t in reversed(range(gen_len)):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, response_mask)
    return token_level_rewards, advantages, returns, kld
