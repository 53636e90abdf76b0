"""One reusable block of memory for a large weight's gradient, across backward calls (the CPU's LM heads).

The fused log-prob op's backward (linear_token_logprobs.py) returns the LM head's gradient dW as a fresh
[V, H] tensor on every call. On the CPU a block that size is a fresh mapping each time: at SmolLM2-135M's shape
it is 113 MB, above glibc's largest mmap threshold (32 MiB), so the GEMM that writes it page-faults every
4 KiB page in, and the optimizer's zero_grad(set_to_none=True) unmaps it again. The fresh block costs ~36 ms
per call on the 2-core CPU (a [49152, 90] x [90, 576] product: 88 ms fresh vs 53 ms into a kept block).

`register(weight)` keeps one block B of the weight's shape. The op's backward calls `lend(weight)`:
- it gets B when no tensor but B itself uses B's memory, i.e. the gradient it handed out last time has been
  dropped (zero_grad(set_to_none=True), `weight.grad = None`);
- otherwise it gets None and allocates a fresh dW, as without a buffer.

The op writes every element of dW into B, the same writes that it would make into a fresh tensor, so the values
are bit for bit the same. It then returns `hand_out()`, a new tensor on B's memory, as the weight's gradient.
Autograd's AccumulateGrad takes that tensor as weight.grad when the weight has none (it keeps a gradient that
nothing else holds), or adds it into the existing gradient. Either way the engine then drops its own reference.

Whether B is free is read from the reference count of its storage: every tensor on that memory holds one.
weight.grad, a user's `g = weight.grad`, and a tensor a hook kept all count. So a gradient that anyone can
still read is never overwritten. With several micro-batches per optimizer step, once B has become weight.grad
the later micro-batches get fresh blocks. B is free again for them when autograd summed dW with another gradient
of the same weight (an untied embedding use) into a new tensor first.

Memory: B stays allocated between optimizer steps, where the fresh dW was freed by zero_grad. While weight.grad
is B, the peak is the same as before.
"""

from __future__ import annotations

import weakref

import torch

# glibc's largest mmap threshold on 64-bit Linux (DEFAULT_MMAP_THRESHOLD_MAX). A block above it is always a fresh
# mapping that faults in page by page. Below it, a long-running process reuses heap blocks, and nothing is saved.
MIN_GRADIENT_BYTES = 32 * 1024 * 1024

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private; without it nothing is lent


def _uses(t: torch.Tensor) -> int:
    return _storage_use_count(t.untyped_storage()._cdata)


def worth_a_buffer(weight: torch.Tensor) -> bool:
    """A trained floating-point CPU weight larger than MIN_GRADIENT_BYTES, on a torch that can count uses."""
    return (_storage_use_count is not None and weight.device.type == "cpu" and weight.requires_grad
            and weight.is_floating_point() and weight.numel() * weight.element_size() > MIN_GRADIENT_BYTES)


class WeightGradBuffer:
    """The block B for one weight, and counts of how often it was lent and how often it was still in use."""

    def __init__(self, weight: torch.Tensor):
        with torch.inference_mode(False), torch.no_grad():
            self.storage = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        self._alone = _uses(self.storage)  # B's own reference (and the count's temporary one)
        self.lent = 0
        self.busy = 0

    def fits(self, weight: torch.Tensor) -> bool:
        return (self.storage.shape == weight.shape and self.storage.dtype == weight.dtype
                and self.storage.device == weight.device)

    def free(self) -> bool:
        return _uses(self.storage) == self._alone

    def hand_out(self) -> torch.Tensor:
        """The gradient to return to autograd: a new tensor on B's memory."""
        return self.storage.detach()


_registry: dict[int, tuple[weakref.ref, WeightGradBuffer]] = {}


def register(weight: torch.Tensor) -> WeightGradBuffer:
    """Keep a gradient block for `weight` (idempotent); it is dropped with the weight."""
    entry = _registry.get(id(weight))
    if entry is not None and entry[0]() is weight:
        return entry[1]
    buffer = WeightGradBuffer(weight)
    key = id(weight)
    _registry[key] = (weakref.ref(weight, lambda _ref, key=key: _registry.pop(key, None)), buffer)
    return buffer


def register_if_worth(weight: torch.Tensor) -> WeightGradBuffer | None:
    """register(weight) where worth_a_buffer(weight), else None."""
    return register(weight) if worth_a_buffer(weight) else None


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


def lend(weight: torch.Tensor) -> WeightGradBuffer | None:
    """`weight`'s block if it has one of its current shape that nothing else uses now, else None."""
    buffer = buffer_of(weight)
    if buffer is None or not buffer.fits(weight):
        return None
    if not buffer.free():
        buffer.busy += 1
        return None
    buffer.lent += 1
    return buffer
