"""Which library runs alignfast's float32 CPU GEMMs: ATen's (MKL's sgemm) or oneDNN's (both ship in libtorch).

Why there is a choice: MKL dispatches its AVX-512 kernels on Intel CPUs only. On the AMD Zen 5 (AVX-512) of our
CI machine one core runs ATen's float32 mm at 85-111 GFLOP/s (MKL's AVX2 rate; MKL_ENABLE_INSTRUCTIONS and
MKL_DEBUG_CPU_TYPE change nothing) and oneDNN's JIT kernel, which picks AVX-512 by the CPU's flags, at 195-248:
1.8-2.3x on the shapes of a 135M-parameter model's training step (bench/NOTES-gemm.md, `python -m bench.bench_gemm`).
Small GEMMs stay on ATen whatever the setting (`min_macs_per_thread`): oneDNN's ~15 us per call loses there.

The setting, ALIGNFAST_CPU_GEMM (or `use(...)` / `set_backend(...)` in code):
  auto    oneDNN on x86-64 CPUs that are not Intel's and have AVX-512 (where it was measured faster), else ATen;
  aten    always ATen: the same GEMM calls as plain PyTorch;
  onednn  oneDNN wherever the extension finds it (an error if it cannot).
It covers the GEMMs of alignfast's own CPU kernels (linear_token_logprobs) and `alignfast.ops.linear`, which
the fast trainer routes its full-sequence forwards through (trainer/policy.py). Results change by float32
rounding only: the two libraries sum the K products in different orders. float64 GEMMs stay on ATen (oneDNN
has no float64 matmul), and so do `ops.linear`'s low-precision ones (ATen already sends bfloat16 to oneDNN).

bfloat16 weights in linear_token_logprobs: where oneDNN is chosen and the CPU has AVX512_BF16, its vocabulary
tiles multiply bf16 x bf16 into float32 on oneDNN's brgemm micro-kernel (csrc/cpu/bf16_gemm.h; ~3x the float32
GEMM of the converted operands on the Zen 5), else in float32 as above. `bf16_products()` says which. Measured on
the Zen 5 only; on Intel CPUs with AVX512_BF16, 'auto' keeps ATen, and ALIGNFAST_CPU_GEMM=onednn turns it on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import threading

import torch

from alignfast import _ext
from alignfast.ops._checks import AlignfastArgumentError, fail

SETTINGS = ("auto", "aten", "onednn")
_CODES = {"aten": 0, "onednn": 1}
_lock = threading.Lock()
_state = {"applied": False}


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The x86 vendor string (GenuineIntel, AuthenticAMD, ...) from /proc/cpuinfo, or '' where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_available() -> bool:
    """Whether the extension is loaded and this libtorch exports oneDNN's matmul entry point."""
    mod = _ext.load()
    return bool(mod is not None and hasattr(mod, "onednn_available") and mod.onednn_available())


def auto_choice() -> str:
    """What 'auto' means on this machine (see the module docstring)."""
    if not onednn_available():
        return "aten"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return "onednn" if x86 and avx512 and cpu_vendor() not in ("GenuineIntel", "") else "aten"


def resolve(setting: str, *, name: str = "ALIGNFAST_CPU_GEMM") -> str:
    """'aten' or 'onednn' for a setting; a clear error naming `name` for a bad one."""
    value = str(setting).strip().lower()
    if value not in SETTINGS:
        fail(name, f"must be one of {list(SETTINGS)}, got {setting!r}")
    if value == "auto":
        return auto_choice()
    if value == "onednn" and not onednn_available():
        fail(name, "is 'onednn' but oneDNN's matmul is not reachable (" +
             (_ext.reason() or "this libtorch does not export at::native::mkldnn_matmul") + "); use 'auto' or 'aten'")
    return value


def _apply(choice: str) -> str:
    mod = _ext.load()
    if mod is None or not hasattr(mod, "cpu_gemm_backend"):
        return "aten"
    previous = mod.cpu_gemm_backend(_CODES[choice])
    return "onednn" if previous == 1 else "aten"


def _ensure_applied() -> None:
    if _state["applied"]:  # every routed forward asks: no lock once the setting is in place
        return
    with _lock:
        if not _state["applied"]:
            _state["applied"] = True
            _apply(resolve(os.environ.get("ALIGNFAST_CPU_GEMM", "auto")))


def apply_environment() -> None:
    """Apply ALIGNFAST_CPU_GEMM now (import time of alignfast.ops). A bad value is not raised here, where it would
    break the import itself (and the command line's error report, which imports alignfast.ops): ATen stays in
    use and `current()` raises the error, which the fast trainers call when they are built."""
    try:
        _ensure_applied()
    except AlignfastArgumentError as err:
        _state["error"] = err


def current() -> str:
    """The library in use now: 'aten' or 'onednn'. Raises the error of a bad ALIGNFAST_CPU_GEMM."""
    if "error" in _state:
        raise _state["error"]
    _ensure_applied()
    mod = _ext.load()
    if mod is None or not hasattr(mod, "cpu_gemm_backend"):
        return "aten"
    return "onednn" if mod.cpu_gemm_backend() == 1 else "aten"


def set_backend(setting: str) -> str:
    """Switch the process to `setting` ('auto', 'aten' or 'onednn'); returns the library used before."""
    if "error" not in _state:
        _ensure_applied()
    choice = resolve(setting, name="backend")
    with _lock:
        _state.pop("error", None)  # an explicit choice replaces a bad ALIGNFAST_CPU_GEMM
        _state["applied"] = True
        return _apply(choice)


def bf16_products() -> bool:
    """Whether linear_token_logprobs multiplies bfloat16 weights as bf16 x bf16 -> float32 on oneDNN's brgemm now
    (oneDNN chosen, oneDNN enabled in torch, AVX512_BF16, and the extension's probe product came out exact)."""
    _ensure_applied()
    mod = _ext.load()
    return bool(mod is not None and hasattr(mod, "bf16_gemm_available") and mod.bf16_gemm_available())


def min_macs_per_thread() -> int:
    """The smallest float32 GEMM, in multiply-adds per thread, that goes to oneDNN: smaller ones stay on ATen,
    because oneDNN's ~15 us of fixed cost per call outweighs its faster kernel there (csrc/cpu/gemm.cpp)."""
    mod = _ext.load()
    return mod.onednn_min_macs() if mod is not None and hasattr(mod, "onednn_min_macs") else 0


def worth_onednn(macs: int) -> bool:
    """Whether a GEMM of `macs` multiply-adds, run at torch's thread count, is large enough for oneDNN (the C++
    rule's arithmetic: multiply-adds per thread, by integer division)."""
    return macs // max(1, torch.get_num_threads()) >= min_macs_per_thread()


@contextlib.contextmanager
def _extension_knob(name: str, value: int, knob: str, missing: str):
    """Sets the extension's process-wide `knob` (a C++ setter returning the previous value) inside the block; a
    negative value or a build without the knob is a one-line error naming argument `name`."""
    if int(value) < 0:
        fail(name, f"must be >= 0, got {value}")
    mod = _ext.load()
    if mod is None or not hasattr(mod, knob):
        fail(name, f"needs the compiled extension alignfast._C{missing} (" + (_ext.reason() or "this build lacks it") +
             ")")
    setter = getattr(mod, knob)
    previous = setter(int(value))
    try:
        yield
    finally:
        setter(previous)


def smallest_gemm(per_thread: int):
    """Inside the block, GEMMs of at least `per_thread` multiply-adds per thread go to oneDNN (0: all; for tests
    and benchmarks of the library itself)."""
    return _extension_knob("per_thread", per_thread, "onednn_min_macs", " with oneDNN support")


def exact_row_counts(limit: int):
    """Inside the block, oneDNN gets at most `limit` distinct row counts per GEMM shape family as they are (others
    as one or two calls on a fixed grid of counts, csrc/cpu/gemm.cpp; default 8). 0 sends every new count to the
    grid: for tests of the grid's calls."""
    return _extension_knob("limit", limit, "onednn_exact_rows", "")


@contextlib.contextmanager
def use(setting: str):
    """Inside the block, CPU GEMMs use `setting` (process-wide: for tests and benchmarks, not threads)."""
    previous = set_backend(setting)
    try:
        yield
    finally:
        set_backend(previous)
