"""One reusable block of memory for a large weight's gradient, across backward calls (the CPU's LM heads).

The fused log-prob op's backward (linear_token_logprobs.py) returns the LM head's gradient dW as a fresh
[V, H] tensor on every call. On the CPU a block that size is a fresh mapping each time: at SmolLM2-135M's shape
it is 113 MB, above glibc's largest mmap threshold (32 MiB), so the GEMM that writes it page-faults every
4 KiB page in, and the optimizer's zero_grad(set_to_none=True) unmaps it again. The fresh block costs ~36 ms
per call on the 2-core CPU (a [49152, 90] x [90, 576] product: 88 ms fresh vs 53 ms into a kept block).

`register(weight)` keeps one block B of the weight's shape. The op's backward calls `lend(weight)`:
- it gets a new tensor on B when nothing but B itself uses B's memory, i.e. the gradient handed out last time
  has been dropped (zero_grad(set_to_none=True), `weight.grad = None`);
- otherwise it gets None and allocates a fresh dW, as without a buffer.

The op writes every element of dW into B, the same writes that it would make into a fresh tensor, so the values
are bit for bit the same. It returns that tensor as the weight's gradient.
Autograd's AccumulateGrad takes that tensor as weight.grad when the weight has none (it keeps a gradient that
nothing else holds), or adds it into the existing gradient. Either way the engine then drops its own reference.

Whether B is free is read from the reference counts of its storage: every tensor on that memory holds one
(weight.grad, a user's `g = weight.grad`, a tensor a hook kept, a numpy view), and a Python storage object someone
kept (`w.grad.untyped_storage()`, one object per storage) holds one on the object B keeps itself. So a gradient
that anyone can still read is never overwritten. The check and the hand-out happen under one lock: two threads
running backward through the same weight (autograd runs a CPU backward on the calling thread) cannot both get B.

With several micro-batches per optimizer step, once B has become weight.grad the later micro-batches get fresh
blocks. B is free again for them when autograd summed dW with another gradient of the same weight (an untied
embedding use) into a new tensor first.

Memory: B stays allocated between optimizer steps, where the fresh dW was freed by zero_grad. The measured cost
at SmolLM2-135M's shape (B = 108 MiB): full fine-tuning's peak RSS went from 6115-6130 MiB to 6179-6220 MiB
(bench/NOTES-trainer.md). `register(weight, owner=trainer)` drops B with the last trainer that asked for it, so
a model that outlives its trainers does not keep it.
"""

from __future__ import annotations

import sys
import threading
import weakref

import torch

# glibc's largest mmap threshold on 64-bit Linux (DEFAULT_MMAP_THRESHOLD_MAX). A block above it is always a fresh
# mapping that faults in page by page. Below it, a long-running process reuses heap blocks, and nothing is saved.
MIN_GRADIENT_BYTES = 32 * 1024 * 1024

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private; without it nothing is lent


def worth_a_buffer(weight: torch.Tensor) -> bool:
    """A trained floating-point CPU weight larger than MIN_GRADIENT_BYTES, on a torch that can count uses."""
    return (_storage_use_count is not None and weight.device.type == "cpu" and weight.requires_grad
            and weight.is_floating_point() and weight.numel() * weight.element_size() > MIN_GRADIENT_BYTES)


class WeightGradBuffer:
    """The block B for one weight, and counts of how often it was lent and how often it was still in use."""

    def __init__(self, weight: torch.Tensor):
        with torch.inference_mode(False), torch.no_grad():
            self.storage = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        # B's Python storage object, kept: a storage has one Python object, so one kept elsewhere is this one and
        # shows in its Python reference count (its C++ count sees only the object's single reference).
        self._py_storage = self.storage.untyped_storage()
        self._alone = (_storage_use_count(self._py_storage._cdata), sys.getrefcount(self._py_storage))
        self._lock = threading.Lock()
        self.owners = 0  # trainers holding it (register(owner=...)); it is dropped when the last one goes
        self.pinned = False  # registered without an owner: kept as long as the weight lives
        self.lent = 0
        self.busy = 0

    def fits(self, weight: torch.Tensor) -> bool:
        return (self.storage.shape == weight.shape and self.storage.dtype == weight.dtype
                and self.storage.device == weight.device)

    def free(self) -> bool:
        """No tensor and no Python storage object but B's own use B's memory now."""
        return (_storage_use_count(self._py_storage._cdata), sys.getrefcount(self._py_storage)) == self._alone

    def take(self) -> torch.Tensor | None:
        """A new tensor on B's memory (the gradient to write dW into and hand to autograd) when B is free, else
        None. Atomic: the returned tensor itself makes B busy for any later call."""
        with self._lock:
            if not self.free():
                self.busy += 1
                return None
            self.lent += 1
            return self.storage.detach()


_registry: dict[int, tuple[weakref.ref, WeightGradBuffer]] = {}


def _drop(key: int, buffer_id: int) -> None:
    """Forget the registry's entry `key` if it still holds the block `buffer_id` (ids: no reference kept alive)."""
    entry = _registry.get(key)
    if entry is not None and id(entry[1]) == buffer_id:
        del _registry[key]


def _owner_gone(key: int, buffer_id: int) -> None:
    entry = _registry.get(key)
    if entry is None or id(entry[1]) != buffer_id:
        return
    buffer = entry[1]
    buffer.owners -= 1
    if buffer.owners == 0 and not buffer.pinned:
        del _registry[key]


def register(weight: torch.Tensor, owner: object | None = None) -> WeightGradBuffer:
    """Keep a gradient block for `weight` (idempotent: one block per weight). Without `owner` it lives as long as
    the weight; with owners (the trainers that asked for it) it is dropped when the last of them is."""
    key = id(weight)
    entry = _registry.get(key)
    if entry is not None and entry[0]() is weight:
        buffer = entry[1]
    else:
        buffer = WeightGradBuffer(weight)
        _registry[key] = (weakref.ref(weight, lambda _ref, key=key, bid=id(buffer): _drop(key, bid)), buffer)
    if owner is None:
        buffer.pinned = True
    else:
        buffer.owners += 1
        weakref.finalize(owner, _owner_gone, key, id(buffer))
    return buffer


def register_if_worth(weight: torch.Tensor, owner: object | None = None) -> WeightGradBuffer | None:
    """register(weight, owner) where worth_a_buffer(weight), else None."""
    return register(weight, owner) if worth_a_buffer(weight) else None


def unregister(weight: torch.Tensor) -> bool:
    """Drop `weight`'s block; True if it had one."""
    entry = _registry.get(id(weight))
    if entry is None or entry[0]() is not weight:
        return False
    del _registry[id(weight)]
    return True


def buffer_of(weight: torch.Tensor) -> WeightGradBuffer | None:
    entry = _registry.get(id(weight))
    return entry[1] if entry is not None and entry[0]() is weight else None


def lend(weight: torch.Tensor) -> torch.Tensor | None:
    """A tensor on `weight`'s block to write dW into and return as its gradient, if the weight has a block of its
    current shape that nothing else uses now; else None."""
    buffer = buffer_of(weight)
    if buffer is None or not buffer.fits(weight):
        return None
    return buffer.take()
