"""Turning a generate() call into decode work: de-duplicated prompts, generated rows, and batches.

A *unit* is one prompt to prefill once. It carries one or more generated *rows* (one per sample that
must be drawn) and, for each row, the (request, sample) output slots that receive its completion:

    greedy, dedupe:    identical prompts and their n samples are all the same completion
                       -> one unit, one row, every slot filled from it
    sampling, dedupe:  identical prompts share one prefill; each (occurrence, sample) is its own row
    dedupe=False:      one unit per (request, sample), one row each (the plain baseline)

Batches are runs of units sorted by prompt length (so left-padding wastes little), cut so that
rows * (longest prompt + max_new_tokens) -- the KV-cache positions the batch may hold -- stays within
the token budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignfast.rollout._sampling import row_key

Slot = tuple[int, int]  # (request index, sample index)


@dataclass
class Unit:
    ids: list[int]
    row_slots: list[list[Slot]] = field(default_factory=list)
    row_keys: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.row_slots)


def build_units(prompt_ids: list[list[int]], *, n: int, greedy: bool, seed: int, dedupe: bool) -> list[Unit]:
    """Units in first-appearance order. Row keys depend only on (seed, prompt, occurrence, sample)."""
    units: dict[tuple[int, ...], Unit] = {}
    occurrences: dict[tuple[int, ...], int] = {}
    out: list[Unit] = []
    for req, ids in enumerate(prompt_ids):
        key = tuple(ids)
        occ = occurrences.get(key, 0)
        occurrences[key] = occ + 1
        if greedy and dedupe:
            unit = units.get(key)
            if unit is None:
                unit = units[key] = Unit(ids, [[]], [0])
                out.append(unit)
            unit.row_slots[0].extend((req, s) for s in range(n))
            continue
        slots = [(req, s) for s in range(n)]
        keys = [0 if greedy else row_key(seed, ids, occ, s) for s in range(n)]
        if dedupe:
            unit = units.get(key)
            if unit is None:
                unit = units[key] = Unit(ids)
                out.append(unit)
            unit.row_slots.extend([slot] for slot in slots)
            unit.row_keys.extend(keys)
        else:
            out.extend(Unit(ids, [[slot]], [k]) for slot, k in zip(slots, keys))
    return out


def plan_batches(units: list[Unit], *, max_new_tokens: int, max_batch_tokens: int,
                 max_batch_size: int | None = None) -> list[list[Unit]]:
    """Longest prompts first (an out-of-memory shows on the first batch, not the last); a unit whose
    rows alone overflow the budget is split into several units over the same prompt."""
    pieces: list[Unit] = []
    for u in units:
        cap = max(1, max_batch_tokens // (len(u.ids) + max_new_tokens))
        if max_batch_size is not None:
            cap = min(cap, max_batch_size)
        for start in range(0, u.rows, cap):
            pieces.append(Unit(u.ids, u.row_slots[start:start + cap], u.row_keys[start:start + cap]))
    pieces.sort(key=lambda u: len(u.ids), reverse=True)

    batches: list[list[Unit]] = []
    current: list[Unit] = []
    rows = width = 0
    for u in pieces:
        new_rows = rows + u.rows
        new_width = max(width, len(u.ids) + max_new_tokens)
        fits = new_rows * new_width <= max_batch_tokens and (max_batch_size is None or new_rows <= max_batch_size)
        if current and not fits:
            batches.append(current)
            current, rows, width = [], 0, 0
            new_rows, new_width = u.rows, len(u.ids) + max_new_tokens
        current.append(u)
        rows, width = new_rows, new_width
    if current:
        batches.append(current)
    return batches
