"""PPO's clipped policy loss straight from the logits, with the vocabulary pass fused.

    logprob, entropy = token_logprobs(logits, tokens, temperature, mask)      (one read of the logits)
    ratio   = exp(logprob - old_logprob)
    pg_loss = mean_valid max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))
    loss    = pg_loss - entropy_coef * mean_valid(entropy)

The per-token terms are O(N) and run as ordinary tensor ops (alignfast.reference.ppo_loss._policy_terms,
the same code the reference uses); everything of size N x V is the fused token_logprobs op. So the
forward reads the logits once, and the backward reads them once more and writes dlogits once, in the
logits' dtype: autograd hands token_logprobs' backward the per-token gradients of logprob (and of
entropy when entropy_coef != 0), and it turns them into dlogits in a single pass.
"""

from __future__ import annotations

import torch

from alignfast import reference
from alignfast.ops import _checks
from alignfast.ops._library import use_reference
from alignfast.ops.token_logprobs import NAME as TOKEN_LOGPROBS
from alignfast.ops.token_logprobs import check_args, token_logprobs
from alignfast.reference.advantages import masked_mean
from alignfast.reference.ppo_loss import _policy_terms


def _check(logits, tokens, old_logprobs, advantages, mask, temperature, cliprange, entropy_coef):
    _checks.tensor("logits", logits, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    lead = logits.shape[:-1]
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages)):
        _checks.tensor(name, t, dtypes=_checks.FLOAT_DTYPES)
        _checks.same_shape("logits' leading dims", logits, name, t, shape=lead)
        _checks.same_device("logits", logits, name, t)
    if mask is None:
        _checks.fail("mask", "is required (the loss is a mean over valid tokens)")
    # tokens, mask and temperature as token_logprobs checks them: the reference path must get the same
    # named errors (it used to fail inside torch.gather, or take temperature 0 silently).
    check_args(logits, tokens, mask, temperature)
    _checks.in_range("cliprange", cliprange, 0.0, 1.0, hi_open=True)
    _checks.finite("entropy_coef", entropy_coef)


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
    """logits [..., V], tokens/old_logprobs/advantages/mask [...] -> (loss, stats).

    loss is a 0-d float32 tensor (float64 for float64 logits), differentiable w.r.t. logits; stats holds
    detached 0-d tensors pg_loss, entropy (mean over valid tokens), clipfrac, approxkl and ratio.
    """
    _check(logits, tokens, old_logprobs, advantages, mask, temperature, cliprange, entropy_coef)
    if use_reference(TOKEN_LOGPROBS, logits):
        return reference.ppo_policy_loss_from_logits(
            logits, tokens, old_logprobs, advantages, mask, temperature=temperature, cliprange=cliprange,
            entropy_coef=entropy_coef)
    logprobs, entropy = token_logprobs(logits, tokens, temperature=temperature, mask=mask, return_entropy=True)
    mask = mask.bool()
    dtype = logprobs.dtype
    pg_loss, stats = _policy_terms(logprobs, old_logprobs.to(dtype), advantages.to(dtype), mask, float(cliprange))
    # Without an entropy bonus, keep entropy out of the graph: the backward then skips its term.
    mean_entropy = masked_mean(entropy if entropy_coef != 0 else entropy.detach(), mask)
    loss = pg_loss - float(entropy_coef) * mean_entropy if entropy_coef != 0 else pg_loss
    stats["entropy"] = mean_entropy.detach()
    return loss, stats
