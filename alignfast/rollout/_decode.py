"""The decode loop of one batch: chunked left-padded prefill, KV cache, finished rows retired.

One batch holds U unique prompts (units, longest first) and R >= U generated rows (the n samples of a
prompt share its prefill: its cache rows are copied, not recomputed).

Prefill: with the packed cache, units are prefilled in chunks of at most `prefill_chunk_tokens` padded
tokens; sorted by length, each chunk pads its prompts only to its own longest one, and writes straight
into the batch's cache (see _kv_cache). With the DynamicCache fallback the batch is one chunk.

Left padding with explicit position ids: a prompt of length L has positions 0..L-1 whatever the pad
width, so it sees the same rotary phases as alone; pads are masked and never reach the outputs.

Retirement: a row that emits an EOS id is dead. Dropping it from the batch copies the whole KV cache,
so dead rows are dropped lazily, once they are `compact_fraction` of the batch: until then they keep
decoding (their tokens after EOS are cut off at the end). This bounds both the wasted compute (a
fraction of the rows) and the copying (each compaction shrinks the batch by that fraction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from alignfast.rollout._batching import Unit
from alignfast.rollout._cache_api import cache_keyword, forward_parameters
from alignfast.rollout._kv_cache import new_dynamic_cache, new_packed_cache, packed_cache_layers
from alignfast.rollout._sampling import choose_tokens, step_uniforms


@dataclass
class ModelRunner:
    """How to call one model: forward(input_ids, attention_mask, position_ids, cache) -> last logits."""

    model: torch.nn.Module
    forward: Callable[..., torch.Tensor]  # prefill
    decode_forward: Callable[..., torch.Tensor]  # one token per row
    packed_layers: int  # > 0: PackedKVCache with this many layers; 0: DynamicCache
    prefill_chunk_tokens: int
    compact_fraction: float


def make_runner(model, *, use_packed_cache: bool = True, prefill_chunk_tokens: int = 8192,
                compact_fraction: float = 0.125, compile: bool = False) -> ModelRunner:
    """Asks the model for the last position's logits only (logits_to_keep in transformers >= 4.50,
    num_logits_to_keep before), so the prefill never materialises [B, T, V].

    compile: decode steps go through torch.compile(model.forward, dynamic=True) (the batch and the
    cache length change from step to step, so shapes are symbolic; no CUDA graphs). The prefill stays
    eager: it runs a few times per call, decode steps hundreds of times."""
    params = forward_parameters(model)
    if params is None:
        raise TypeError(f"{type(model).__name__}.forward has no readable signature: left-padded batching needs "
                        "to know that it takes position_ids")
    if "position_ids" not in params:
        raise TypeError(f"{type(model).__name__}.forward takes no position_ids: left-padded batching needs them")
    keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    extra = {keep_kw: 1} if keep_kw else {}
    cache_kw = cache_keyword(model)

    def bind(fn):
        def forward(input_ids, attention_mask, position_ids, cache):
            out = fn(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=True, **{cache_kw: cache}, **extra)
            return out.logits[:, -1, :]
        return forward

    eager = bind(model)
    decode = bind(torch.compile(model.forward, dynamic=True)) if compile else eager
    layers = packed_cache_layers(model) if use_packed_cache else 0
    return ModelRunner(model, eager, decode, layers, prefill_chunk_tokens, compact_fraction)


def _prefill_chunks(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges of prompts whose padded prefill (count * longest) fits the budget
    (a prompt longer than the budget is a chunk of its own)."""
    chunks, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        longest = max(longest, n)
        if i > start and (i - start + 1) * longest > budget:
            chunks.append((start, i))
            start, longest = i, n
    chunks.append((start, len(lengths)))
    return chunks


def _select_rows(cache, indices: torch.Tensor) -> None:
    """Row i of the DynamicCache becomes its row indices[i] (copies for n samples, drops for finished rows).

    Cache.reorder_cache (beam search's row gather, an index_select on every state) rather than
    batch_select_indices: every transformers cache layer implements it for all of its states, while a
    linear-attention layer (LFM2, Qwen3-Next, Jamba, Bamba, RecurrentGemma) has no batch_select_indices, and
    a layer holding both kinds of state inherits one that selects only its keys and values."""
    cache.reorder_cache(indices)


def decode_batch(runner: ModelRunner, units: list[Unit], *, max_new_tokens: int, temperature: float,
                 top_p: float, eos_ids: torch.Tensor, pad_id: int, device: torch.device) -> list[list[int]]:
    """Generated token ids per row, rows in unit order; a row that stopped ends with its EOS id."""
    lengths = [len(u.ids) for u in units]
    rows_per_unit = [u.rows for u in units]
    width, R = max(lengths), sum(rows_per_unit)
    capacity = width + max_new_tokens
    sampling = temperature > 0.0
    keys = np.array([k for u in units for k in u.row_keys], dtype=np.uint64)
    row_start = np.concatenate([[0], np.cumsum(rows_per_unit)])

    def pick(logits, rows_host):
        u = torch.from_numpy(step_uniforms(keys[rows_host], step)).to(device) if sampling else None
        return choose_tokens(logits, temperature=temperature, top_p=top_p, uniforms=u)

    # --- prefill -------------------------------------------------------------------------------
    step = 0
    packed = runner.packed_layers > 0
    cache = new_packed_cache(runner.packed_layers, R, capacity) if packed else new_dynamic_cache(runner.model)
    chunks = _prefill_chunks(lengths, runner.prefill_chunk_tokens) if packed else [(0, len(units))]
    first = torch.empty(R, dtype=torch.long, device=device)
    for a, b in chunks:
        w = max(lengths[a:b])
        ids = torch.full((b - a, w), pad_id, dtype=torch.long)
        mask = torch.zeros((b - a, w), dtype=torch.long)
        for i, u in enumerate(units[a:b]):
            ids[i, w - lengths[a + i]:] = torch.tensor(u.ids, dtype=torch.long)
            mask[i, w - lengths[a + i]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        r0, r1 = int(row_start[a]), int(row_start[b])
        expand = None
        if r1 - r0 != b - a:  # several rows per prompt: copy the prompt's keys instead of recomputing
            expand = torch.repeat_interleave(torch.arange(b - a), torch.tensor(rows_per_unit[a:b])).to(device)
        target = cache.prefill_view(r0, r1, width - w, expand) if packed else cache
        logits = runner.forward(ids.to(device), mask.to(device), positions.to(device), target)
        first[r0:r1] = pick(logits if expand is None else logits[expand], np.arange(r0, r1))
        if not packed and expand is not None:
            _select_rows(cache, expand)
    if packed:
        cache.finish_prefill(width)

    # --- decode --------------------------------------------------------------------------------
    attn = torch.ones((R, capacity), dtype=torch.long)
    for i, u in enumerate(units):
        attn[int(row_start[i]):int(row_start[i + 1]), :width - lengths[i]] = 0
    attn = attn.to(device)
    next_pos = torch.repeat_interleave(torch.tensor(lengths), torch.tensor(rows_per_unit)).to(device)
    rows = torch.arange(R, device=device)  # batch position -> row
    rows_host = np.arange(R)
    alive = torch.ones(R, dtype=torch.bool, device=device)
    out = torch.full((R, max_new_tokens), -1, dtype=torch.long, device=device)
    tokens = first
    for step in range(max_new_tokens):
        if step > 0:
            tokens = pick(logits, rows_host)
        out[rows, step] = tokens
        if step + 1 == max_new_tokens:
            break
        alive &= ~torch.isin(tokens, eos_ids)
        n_alive = int(alive.sum())
        if n_alive == 0:
            break
        if (alive.numel() - n_alive) >= max(1.0, runner.compact_fraction * alive.numel()):
            keep = alive.nonzero().squeeze(1)
            if packed:
                cache.batch_select_indices(keep)
            else:
                _select_rows(cache, keep)
            attn, next_pos, tokens, rows = attn[keep], next_pos[keep], tokens[keep], rows[keep]
            rows_host = rows_host[keep.cpu().numpy()]
            alive = alive[keep]
        logits = runner.decode_forward(tokens[:, None], attn[:, :width + step + 1], next_pos[:, None], cache)
        next_pos = next_pos + 1

    out = out.cpu()
    eos = eos_ids.cpu()
    generated = []
    for row in out:
        row = row[row >= 0]
        hits = torch.isin(row, eos).nonzero()
        generated.append(row[: int(hits[0]) + 1].tolist() if hits.numel() else row.tolist())
    return generated
