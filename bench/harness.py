"""Shared benchmark machinery: timing, peak extra memory, tables, and RESULTS.md entries.

Benchmarks measure; tests assert. Every table row carries the provider's median time, its peak
extra memory and its ratio to the baseline provider measured in the same run.

Peak extra memory:
  CUDA: torch.cuda.max_memory_allocated() during the call minus memory allocated before it.
  CPU:  the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident
        set before the call. glibc is told to serve every allocation over 64 KiB with mmap, so freed
        blocks go back to the OS and each call's allocations show in the resident set.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

try:  # M_MMAP_THRESHOLD = -3: fixed threshold, no dynamic growth, so RSS tracks live allocations.
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallopt(-3, 64 * 1024)
except OSError:
    _libc = None


MEMORY_MMAP_THRESHOLD = 64 * 1024          # while measuring peak memory (see the module docstring)
TIMING_MMAP_THRESHOLD = 32 * 1024 * 1024   # glibc's own ceiling for its dynamic threshold: a normal process


def set_mmap_threshold(nbytes: int) -> None:
    """Serving every allocation over 64 KiB with mmap makes peak memory show in the resident set, but it
    also makes each fresh tensor page-fault in, which is not how a normal process runs: benchmarks that
    time whole programs (the engine, the demo) switch to TIMING_MMAP_THRESHOLD for their timed runs."""
    if _libc is not None:
        _libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def _read_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 2, reps: int = 10,
                max_seconds: float = 20.0) -> float:
    """Median wall time in seconds of fn() over `reps` runs (fewer if max_seconds runs out, at least 3)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    for i in range(reps):
        if device.startswith("cuda"):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start_all > max_seconds:
            break
    return statistics.median(times)


def peak_extra_memory(fn: Callable[[], object], *, device: str = "cpu") -> int | None:
    """Bytes of memory the call needed beyond what was allocated before it (None if unmeasurable)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return max(0, peak - before)
    if _libc is not None:
        _libc.malloc_trim(0)
    rss = _read_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    out = fn()
    hwm = _read_status_kib("VmHWM")
    del out
    if rss is None or hwm is None:
        return None
    return max(0, (hwm - rss) * 1024)


@dataclass
class Row:
    shape: str
    provider: str
    seconds: float | None
    peak_bytes: int | None
    extra: dict = field(default_factory=dict)
    error: str | None = None


def run_providers(shape: str, providers: dict[str, Callable[[], Callable[[], object]]], *, device: str = "cpu",
                  warmup: int = 2, reps: int = 10, measure_memory: bool = True) -> list[Row]:
    """providers: name -> factory returning the zero-argument callable to time (inputs bound inside).

    A provider that raises (not installed, out of memory, unsupported) gets a row with its error,
    so the table says what could not run rather than silently dropping it.
    """
    rows = []
    for name, factory in providers.items():
        try:
            fn = factory()
            seconds = median_time(fn, device=device, warmup=warmup, reps=reps)
            peak = peak_extra_memory(fn, device=device) if measure_memory else None
            rows.append(Row(shape, name, seconds, peak))
        except Exception as err:  # noqa: BLE001 - recorded in the table
            rows.append(Row(shape, name, None, None, error=f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"))
        finally:
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(rows: list[Row], *, baseline: str, extra_columns: tuple[str, ...] = ()) -> str:
    """Markdown table; 'vs baseline' = baseline time / provider time in the same shape (higher is faster)."""
    header = ["shape", "provider", "median ms", f"speed-up vs {baseline}", "peak extra mem", *extra_columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = {r.shape: r.seconds for r in rows if r.provider == baseline and r.seconds}
    for r in rows:
        if r.seconds is None:
            cells = [r.shape, r.provider, "failed", "", "", *["" for _ in extra_columns]]
            cells[3] = r.error or ""
        else:
            ratio = base.get(r.shape)
            cells = [r.shape, r.provider, f"{r.seconds * 1e3:.3f}",
                     f"{ratio / r.seconds:.2f}x" if ratio else "n/a", _fmt_bytes(r.peak_bytes),
                     *[str(r.extra.get(c, "")) for c in extra_columns]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_description(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def measured_copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device=device, warmup=3, reps=20)
    return 2 * nbytes / seconds


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_results(title: str, table: str, *, device: str = "cpu", notes: str = "") -> None:
    """Append a dated section (title, device, commit, table, notes) to bench/RESULTS.md."""
    stamp = datetime.date.today().isoformat()
    section = [f"\n## {title}\n", f"{stamp}, commit {git_commit()}, {device_description(device)}\n", "", table, ""]
    if notes:
        section += [notes, ""]
    with open(RESULTS, "a") as f:
        f.write("\n".join(section))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("0", "", "false", "no")
