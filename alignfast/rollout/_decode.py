"""The decode loop of one batch: left-padded prefill, KV cache, rows retired as they finish.

One batch holds U unique prompts and R >= U generated rows (several samples of one prompt share its
prefill: the prompt's cache rows are copied, not recomputed). Each step feeds only the rows still
running: when a row emits an EOS id its cache rows, mask row and position are dropped, so the batch
shrinks instead of computing until its slowest row ends.

Left padding with explicit position ids: a prompt of length L gets positions 0..L-1 whatever the pad
width, so its tokens see the same rotary phases as when run alone; pads are masked out of attention
and never reach the outputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import torch

from alignfast.rollout._batching import Unit
from alignfast.rollout._sampling import choose_tokens, step_uniforms


def make_cache_factory(model) -> Callable[[], object]:
    """DynamicCache for this model's config (transformers >= 5 wants the config; 4.x takes none)."""
    from transformers import DynamicCache

    try:
        DynamicCache(config=model.config)
        return lambda: DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache


def make_forward(model) -> Callable[..., torch.Tensor]:
    """forward(input_ids, attention_mask, position_ids, cache) -> last-position logits [B, V].

    Asks the model for the last position's logits only (logits_to_keep in transformers >= 4.50,
    num_logits_to_keep before), so the prefill never materialises [B, T, V].
    """
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params:
        raise TypeError(f"{type(model).__name__}.forward takes no position_ids: left-padded batching needs them")
    keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    extra = {keep_kw: 1} if keep_kw else {}

    def forward(input_ids, attention_mask, position_ids, cache):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True, **extra)
        return out.logits[:, -1, :]

    return forward


def decode_batch(forward, new_cache, units: list[Unit], *, max_new_tokens: int, temperature: float,
                 top_p: float, eos_ids: torch.Tensor, pad_id: int, device: torch.device) -> list[list[int]]:
    """Generated token ids per row, rows in unit order; a row that stopped ends with its EOS id."""
    U = len(units)
    lengths = [len(u.ids) for u in units]
    width = max(lengths)
    ids = torch.full((U, width), pad_id, dtype=torch.long)
    # the mask for the whole run: prompt part left-padded, generated part all ones; step s uses a prefix
    mask = torch.ones((U, width + max_new_tokens), dtype=torch.long)
    for i, u in enumerate(units):
        pad = width - lengths[i]
        ids[i, pad:] = torch.tensor(u.ids, dtype=torch.long)
        mask[i, :pad] = 0
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)

    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    cache = new_cache()
    logits = forward(ids, mask[:, :width], positions, cache)

    rows_per_unit = torch.tensor([u.rows for u in units])
    R = int(rows_per_unit.sum())
    next_pos = torch.tensor(lengths, dtype=torch.long)
    if R != U:  # several rows per prompt: copy the prompt's cache instead of recomputing it
        expand = torch.repeat_interleave(torch.arange(U), rows_per_unit)
        next_pos = next_pos[expand]
        expand = expand.to(device)
        cache.batch_select_indices(expand)
        logits, mask = logits[expand], mask[expand]
    next_pos = next_pos.to(device)
    sampling = temperature > 0.0
    keys = np.array([k for u in units for k in u.row_keys], dtype=np.uint64)

    out = torch.full((R, max_new_tokens), -1, dtype=torch.long, device=device)
    active = torch.arange(R, device=device)
    active_host = np.arange(R)
    for step in range(max_new_tokens):
        uniforms = torch.from_numpy(step_uniforms(keys[active_host], step)).to(device) if sampling else None
        tokens = choose_tokens(logits, temperature=temperature, top_p=top_p, uniforms=uniforms)
        out[active, step] = tokens
        if step + 1 == max_new_tokens:
            break
        done = torch.isin(tokens, eos_ids)
        if bool(done.any()):
            keep_host = (~done).nonzero().squeeze(1).cpu()
            if keep_host.numel() == 0:
                break
            keep = keep_host.to(device)
            cache.batch_select_indices(keep)
            mask, next_pos, tokens, active = mask[keep], next_pos[keep], tokens[keep], active[keep]
            active_host = active_host[keep_host.numpy()]
        logits = forward(tokens[:, None], mask[:, :width + step + 1], next_pos[:, None], cache)
        next_pos = next_pos + 1

    out = out.cpu()
    return [row[row >= 0].tolist() for row in out]
