"""glibc's heap and a training run's peak memory (config.malloc_mmap_threshold).

glibc serves allocations below its mmap threshold (dynamic, at most 32 MiB) from heaps that return memory to the
system only from their top. A PPO step allocates and frees thousands of per-layer tensors of a few MiB
(activations, gradients, optimizer temporaries) in changing orders, so freed blocks stay resident and later
allocations that do not fit the holes grow the heap: measured on SmolLM2-135M's shape, the step's peak RSS was
0.6 GiB (full fine-tuning) to 2.1 GiB (LoRA) above what the live tensors need (bench/NOTES-trainer.md).
A lower threshold maps each larger block on its own and unmaps it on free, so the peak is what is live.
The same as starting the process with MALLOC_MMAP_THRESHOLD_=<bytes> in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

_log = logging.getLogger("alignfast.trainer")
_M_MMAP_THRESHOLD = -3


def set_mmap_threshold(nbytes: int) -> bool:
    """mallopt(M_MMAP_THRESHOLD, nbytes) for the whole process; False (with a warning) where libc is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        ok = False
    if not ok:
        _log.warning("malloc_mmap_threshold: this C library has no glibc mallopt; the setting has no effect")
    return ok
