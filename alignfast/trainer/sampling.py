"""Autoregressive sampling of the trained policy with a KV cache and an explicit torch.Generator.

Why not model.generate: PPO needs (a) samples that are a pure function of (parameters, seed), so a
resumed run and an uninterrupted one draw the same tokens, and (b) the log-probability of each
drawn token under the tempered distribution, which the fast path can take from the sampler
instead of a second forward pass. generate() draws from the global RNG and returns neither cheaply.

Token choice at each step, with z = logits / temperature:
    greedy (temperature == 0): argmax z
    otherwise: keep the top_k largest z (top_k > 0), then the smallest set whose softmax mass
    reaches top_p (top_p < 1), renormalise, draw one token with `generator`.
A row stops after its first stop token; later positions hold pad_id and are not actions.
The returned log-probs are log softmax(z)[token] of the unfiltered tempered distribution (the
policy PPO optimises), as TRL computes them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from alignfast.rollout._cache_api import cache_keyword, output_cache
from alignfast.rollout._pad_mask import pad_safe_attention


@dataclass
class SampledBatch:
    """query_ids/query_mask [B, Q] left-padded; response_ids/response_mask [B, R] right-padded.

    response_mask marks the actions: every generated token up to and including the first stop token.
    ended[b]: the row stopped on a stop token (else it ran out of max_new_tokens).
    logprobs [B, R] (float32, 0 off the mask) when the sampler was asked for them; values likewise.
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (ids [B, Q], mask [B, Q] bool)."""
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = True
    return ids.to(device), mask.to(device)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only real tokens (left padding gets 0), as HF generate computes them."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def filter_logits(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k / nucleus set (z is [B, V], already tempered)."""
    if top_k > 0 and top_k < z.size(-1):
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def last_logits_kwargs(model) -> dict:
    """Ask for the last position's logits only (logits_to_keep since transformers 4.50,
    num_logits_to_keep before), so the prefill never builds [B, Q, V] logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def draw_tokens(probs: torch.Tensor, generator: torch.Generator | None,
                draw_rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One token per row of probs [B, V]. Without draw_rows: torch.multinomial(probs, 1). With
    draw_rows=(first, total): the same draw written out (torch's one-sample multinomial is the
    exponential race argmax_v p_v / q_v, q ~ Exp(1) i.i.d., with q drawn as one [rows, V] tensor), with
    q drawn for all `total` rows and rows [first, first + B) kept, so a row's token depends on its place
    in the whole batch and the generator, not on which process samples it."""
    if draw_rows is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    first, total = draw_rows
    q = torch.empty((total, probs.size(1)), dtype=probs.dtype, device=probs.device).exponential_(1, generator=generator)
    return (probs / q[first: first + probs.size(0)]).argmax(dim=-1)


@torch.no_grad()
@pad_safe_attention()  # left-padded queries: see alignfast.rollout._pad_mask
def sample(model, query_ids: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int,
           stop_ids: Sequence[int], pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None,
           logprob_fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
           value_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
           draw_rows: tuple[int, int] | None = None) -> SampledBatch:
    """Sample up to max_new_tokens continuations of left-padded queries (temperature 0: greedy).

    logprob_fn(logits [B, V], tokens [B], temperature) -> [B] log-probs; when given, the per-token
    log-probs of the drawn tokens are returned in SampledBatch.logprobs.
    value_fn(last hidden state [B, H]) -> [B]; when given, the value of the state each token is drawn
    from (a value head on the policy's own backbone) is returned in SampledBatch.values.
    draw_rows=(first, total): these B rows are rows [first, first + B) of a batch of `total` rows
    sampled with the same generator; each row gets exactly the token that batch would give it (see
    draw_tokens), so N processes sampling their shares reproduce one process sampling all rows.
    """
    device = query_ids.device
    B = query_ids.size(0)
    stop = torch.tensor(sorted(set(int(s) for s in stop_ids)), dtype=torch.long, device=device)
    attention = query_mask.long()
    positions = position_ids_from_mask(query_mask)
    next_position = positions[:, -1:] + 1
    tokens_out, logprobs_out, values_out = [], [], []
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    valid_out = []

    keep = last_logits_kwargs(model)
    cache_kw = cache_keyword(model)
    if value_fn is not None:  # the last layer's output too (logits_to_keep leaves hidden states whole)
        keep = {**keep, "output_hidden_states": True}
    out = model(input_ids=query_ids, attention_mask=attention, position_ids=positions, use_cache=True, **keep)
    cache = output_cache(out)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if temperature == 0:
            token = logits.argmax(dim=-1)
        else:
            z = filter_logits(logits / temperature, top_k, top_p)
            probs = torch.softmax(z, dim=-1)
            token = draw_tokens(probs, generator, draw_rows)
        if logprob_fn is not None:
            logprobs_out.append(logprob_fn(logits, token, temperature if temperature > 0 else 1.0))
        if value_fn is not None:
            values_out.append(value_fn(out.hidden_states[-1][:, -1, :]))
        active = ~finished
        token = torch.where(active, token, torch.full_like(token, pad_id))
        tokens_out.append(token)
        valid_out.append(active)
        finished = finished | (active & torch.isin(token, stop))
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones((B, 1), dtype=attention.dtype, device=device)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_position,
                    use_cache=True, **{cache_kw: cache}, **keep)
        cache = output_cache(out)
        next_position = next_position + 1

    response_ids = torch.stack(tokens_out, dim=1)
    response_mask = torch.stack(valid_out, dim=1)
    logprobs = None
    if logprob_fn is not None:
        logprobs = torch.stack(logprobs_out, dim=1).float()
        logprobs = torch.where(response_mask, logprobs, torch.zeros_like(logprobs))
    values = None
    if value_fn is not None:
        values = torch.stack(values_out, dim=1).float()
        values = torch.where(response_mask, values, torch.zeros_like(values))
    return SampledBatch(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids,
                        response_mask=response_mask, ended=finished, logprobs=logprobs, values=values)
