"""Prompt datasets and a batch order that is a pure function of (seed, step).

A dataset is a list of strings, a list of dicts with a "prompt" key (other keys become columns
passed to the reward functions, as in TRL's GRPO), or a `datasets.Dataset` with a "prompt" column.

Order: epoch e visits the prompts in the permutation drawn from a generator seeded with (seed, e);
the run is the concatenation of these epochs, cut into consecutive batches. Batch k is therefore
computable from k alone, so resuming at step k needs no sampler state.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alignfast.ops._checks import fail


@dataclass
class PromptBatch:
    prompts: list[str]
    columns: dict[str, list]


class PromptDataset:
    def __init__(self, data, *, name: str = "train_dataset"):
        prompts, columns = _normalise(data, name)
        if not prompts:
            fail(name, "is empty")
        self.prompts = prompts
        self.columns = columns

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, indices: Sequence[int]) -> PromptBatch:
        return PromptBatch(prompts=[self.prompts[i] for i in indices],
                           columns={k: [v[i] for i in indices] for k, v in self.columns.items()})

    def batches(self, batch_size: int):
        """Consecutive batches in dataset order (evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.select(range(start, min(start + batch_size, len(self))))


@functools.lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, stream=1))
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Dataset indices of batch `step` (0-based) of the run."""
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = epoch_permutation(n, seed, epoch)
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset: offset + take])
    return out


def derive_seed(seed: int, step: int, *, stream: int) -> int:
    """A 63-bit seed for (run seed, step, stream): independent streams for data, sampling, mini-batches."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    x ^= x >> 32
    return x & ((1 << 63) - 1)


def _normalise(data, name: str) -> tuple[list[str], dict[str, list]]:
    if data is None:
        fail(name, "is required")
    column_names = getattr(data, "column_names", None)
    if column_names is not None and not isinstance(data, (list, tuple)):  # a datasets.Dataset
        if "prompt" not in column_names:
            fail(name, f"needs a 'prompt' column, has {list(column_names)}")
        prompts = list(data["prompt"])
        columns = {c: list(data[c]) for c in column_names if c != "prompt"}
    else:
        data = list(data)
        if all(isinstance(x, str) for x in data):
            prompts, columns = data, {}
        elif all(isinstance(x, dict) for x in data):
            for i, row in enumerate(data):
                if "prompt" not in row:
                    fail(name, f"row {i} has no 'prompt' key")
            keys = [k for k in data[0] if k != "prompt"]
            for i, row in enumerate(data):  # a missing column would reach the reward functions as None
                if len(row) != len(keys) + 1 or any(k not in row for k in keys):
                    other = next((k for k in keys if k not in row), None)
                    detail = (f"lacks column '{other}' that row 0 has" if other is not None else
                              f"has column '{next(k for k in row if k not in keys and k != 'prompt')}' that row 0 lacks")
                    fail(name, f"row {i} {detail} (every row needs the same columns; use None for a missing value)")
            prompts = [row["prompt"] for row in data]
            columns = {k: [row.get(k) for row in data] for k in keys}
        else:
            fail(name, "must be a list of strings, a list of dicts with "
                 "a 'prompt' key, or a datasets.Dataset with a 'prompt' column")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            fail(name, f"prompt {i} must be a string, got "
                 f"{type(p).__name__}")
    return prompts, columns
