"""propose_token: one step of Proxy-RLHF's propose-judge-resample loop, the specification.

For one row with logits l [V], excluded tokens X (the proxy's rejections at this position, and the
tokens outside top-k when top-k is on), a uniform u in [0, 1), temperature T >= 0 and top_p in (0, 1]:

    z = l / tau,  tau = T if T > 0 else 1          q = softmax(z) over every token (X included)
    S(k) = sum_{j : l_j > l_k} q_j                  the mass strictly more likely than k
    N = {k : l_k > -inf and S(k) < top_p}          the nucleus of the target's own distribution
                                                    (every finite token when top_p == 1)
    A = N minus X                                   the tokens the target may still propose

    T > 0:  w_k = exp(z_k - max_{j in A} z_j) for k in A, W = sum_A w
            token = the first k (index order) with sum_{j in A, j <= k} w_j > min(u W, nextafter(W, 0))
            logprob = z_token - max_A z - log W      (log-prob under q restricted to A, renormalised)
    T == 0: token = the first argmax of l over A, logprob = 0 (a point mass)
    A empty: token = -1, logprob = -inf
    num_allowed = |A|

Non-finite logits. A row with a NaN logit, or with a +inf logit when T > 0, has no distribution (its
softmax is NaN): it gets token = -1, logprob = NaN, num_allowed = 0, whatever top_p and X are. The NaN
log-prob tells such a row from one whose A is merely empty (-inf). With T == 0 a +inf logit is an
ordinary maximum: q is the limit of the softmax, its mass shared by the +inf tokens, so for top_p < 1
N is the +inf tokens (for top_p == 1 every token with l > -inf, as above), and the greedy rule takes the
first +inf token of A (an empty A, every +inf token excluded under top_p < 1, is -1 / -inf as above).
-inf logits are never proposed.

Why these choices. The nucleus is taken on the target's distribution *before* rejections, so a
rejection never widens the candidate set: re-proposals stay inside what the target itself finds
plausible (the paper's knowledge-aware restriction). It is defined on values, not on a sort order
(ties are kept or dropped together), so every implementation agrees without sorting. Sampling by
inverse CDF in index order with the caller's uniform makes the C++ and Triton kernels reproduce the
same token from the same number; with nothing excluded and top_p == 1 it is the same rule as the
HF engine's sampler (alignfast.rollout._sampling.choose_tokens), which is what makes an always-accepting
proxy reproduce the target's own samples. A non-finite row is refused rather than repaired: treating a
NaN as -inf would sample from a distribution the target never produced, and a +inf logit at T > 0 is
almost always an overflow (float16 logits), whose only limit (a draw among the +inf tokens) has no
meaningful log-prob; the kernels see both in the pass that already finds the row's max, at no extra
cost, and the caller (the proxy decoder) can name the cause instead of reporting an empty allowed set.
"""

from __future__ import annotations

import torch


def nucleus(logits: torch.Tensor, *, temperature: float, top_p: float) -> torch.Tensor:
    """[B, V] bool: the nucleus N of each row (see the module docstring), on the sorted values. A row with a NaN
    logit has none; a row with a +inf logit has, for top_p < 1, its +inf tokens (the softmax's limit)."""
    finite = logits > float("-inf")  # +inf included; False for NaN
    nan_row = torch.isnan(logits).any(dim=-1, keepdim=True)
    if top_p >= 1.0:
        return finite & ~nan_row
    posinf = torch.isposinf(logits)
    inf_row = posinf.any(dim=-1, keepdim=True)
    # scaled after the row's max is subtracted (softmax is shift-invariant): l / tau overflows float32 near its max
    z = (logits - logits.amax(dim=-1, keepdim=True)) / (temperature if temperature > 0 else 1.0)
    # an all -inf row has no nucleus; NaN and +inf rows are decided above (their softmax is NaN)
    usable = finite.any(dim=-1, keepdim=True) & ~nan_row & ~inf_row
    safe = torch.where(usable, z, torch.zeros_like(z))
    q = torch.softmax(safe, dim=-1)
    # "more likely" compares the logits themselves (z = l / tau is monotone in l; comparing l keeps
    # rounding in the division from merging or splitting ties)
    ls = torch.where(usable, logits, torch.zeros_like(logits))
    lsorted, order = ls.sort(dim=-1, descending=True)
    qs = q.gather(-1, order)
    cum = torch.cat([torch.zeros_like(qs[:, :1]), qs.cumsum(-1)], dim=-1)
    # number of tokens strictly more likely than k: a binary search in the ascending -lsorted
    n_greater = torch.searchsorted((-lsorted).contiguous(), (-ls).contiguous(), side="left")
    mass_above = cum.gather(-1, n_greater)
    regular = finite & (mass_above < top_p) & usable
    return torch.where(inf_row, posinf, regular) & ~nan_row


def propose_token(logits: torch.Tensor, excluded: torch.Tensor, uniforms: torch.Tensor, *, temperature: float,
                  top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B] int64, logprobs [B], num_allowed [B] int64) for logits [B, V], excluded [B, V] bool,
    uniforms [B] in [0, 1). Computed in the logits' dtype (float64 for the ground truth). A row with a NaN logit,
    or a +inf one when temperature > 0, gets (-1, NaN, 0)."""
    no_distribution = torch.isnan(logits).any(dim=-1)
    if temperature > 0.0:
        no_distribution |= torch.isposinf(logits).any(dim=-1)
    allowed = nucleus(logits, temperature=temperature, top_p=top_p) & ~excluded & ~no_distribution[:, None]
    num_allowed = allowed.sum(-1)
    neg_inf = torch.full_like(logits, float("-inf"))
    masked = torch.where(allowed, logits, neg_inf)
    empty = num_allowed == 0
    if temperature == 0.0:
        tokens = masked.argmax(dim=-1)  # the first maximal index
        logprobs = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    else:
        # d = (l - max_A l) / tau <= 0, the raw max subtracted before scaling, as the kernels do: l / tau alone
        # overflows in float32 for logits near its maximum at a small temperature
        m = masked.max(dim=-1, keepdim=True).values
        m = torch.where(empty[:, None], torch.zeros_like(m), m)
        d = (masked - m) / temperature
        w = torch.where(allowed, torch.exp(d), torch.zeros_like(d))
        cum = w.cumsum(dim=-1)
        total = cum[:, -1:]
        target = torch.minimum(uniforms.view(-1, 1).to(cum.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cum, target, right=True).squeeze(-1).clamp(max=logits.shape[1] - 1)
        logprobs = d.gather(-1, tokens[:, None]).squeeze(-1) - torch.log(total.squeeze(-1))
    tokens = torch.where(empty, torch.full_like(tokens, -1), tokens)
    logprobs = torch.where(empty, torch.full_like(logprobs, float("-inf")), logprobs)
    logprobs = torch.where(no_distribution, torch.full_like(logprobs, float("nan")), logprobs)
    return tokens, logprobs, num_allowed
