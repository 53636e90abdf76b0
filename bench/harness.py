"""Shared benchmark machinery: interleaved rounds, spread, peak extra memory, tables, RESULTS.md entries.

Benchmarks measure; tests assert. A shared, loaded machine makes any single timing unreliable (one run of
a loop that took 10x its idle time once became a README headline), so every op benchmark goes through
run_rounds:

  * rounds >= 5, in one process; in each round every provider runs in turn (round-robin, the order rotated
    from round to round), on a fresh input draw for that round shared by all providers;
  * a provider's time per round is the median of `reps` calls; its row shows the median over rounds and the
    inter-quartile range (q1-q3);
  * the speed-up against a baseline is computed per round (baseline time / provider time in the same round) and
    summarised as the median ratio and its IQR. That cancels drift that slows both providers of a round alike
    (clock, thermal, a slow phase of another job), not load in general: the providers of a round run one after
    another, and a baseline made of many small OpenMP regions (TRL's per-row loop, the GAE loops) stalls far more
    under load than one fused call, so load inflates the speed-ups in alignfast's favour (31.8x at load 4-7 where
    load 1.1 gave 5.0x). The section stamp records the load average and the usable cores; readme_table marks a
    section recorded at a load >= its cores "indicative only";
  * a row whose time or ratio spread (IQR / median) exceeds SPREAD_WARNING is flagged in the table;
  * on CUDA every round starts each provider with an untimed call (round_warmup), so a round's timed calls never
    pay for what the previous provider left behind, and the allocator's cache is kept between providers (peak
    memory is read from reset_peak_memory_stats / max_memory_allocated, which emptying the cache did not change;
    emptying it only made the next round's first timed call pay for cudaMalloc). `reps` must be odd, so that a
    round's time is one call's, not the mean of a cold and a warm one;
  * with `check`, every provider's output in the first round is compared with the first provider's
    (torch.testing.assert_close): a provider that computes something else, or an op that silently fell back, is
    one error naming both, before anything is timed further or recorded.

Clock (CPU only): "wall" (perf_counter, the default) or "cpu" (time.process_time: CPU seconds of every thread
of the process). On a shared machine, wall time also counts the time a thread waits for a core, and with
several OpenMP threads one descheduled worker stalls a whole barrier; CPU time with --threads 1 counts only
the work each provider does, which is the kernel comparison that load cannot distort (it still moves with
cache and memory-bandwidth contention from other jobs).

Allocator (CPU): every timed call, on either clock, runs with glibc set as a long-running process ends up
(normal_allocator: blocks up to 32 MiB from the heap, freed ones kept for reuse). Under a 64 KiB mmap threshold
(measuring_allocator, which this module once kept on for its memory measure), a provider that allocates a large
temporary per call (TRL's selective_log_softmax: a [T, V] log_softmax per batch row) pays a page fault per 4 KiB
of it on every call.
(A plain process in glibc's default dynamic mode is in between: TRL's bf16 path at [8, 256, 32000] still
faults ~47 MB a call there, 28 of its 85 ms CPU time in the kernel.)

Peak extra memory (measured once per provider, outside the timed calls): the most bytes torch's allocator held
during one call beyond what it held when the call began; on CUDA from torch.cuda.max_memory_allocated(), on CPU
from the profiler's allocation events (peak_extra_memory says why not the resident set).
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
ROUNDS = 5              # the fewest rounds a recorded table may have
SPREAD_WARNING = 0.25   # IQR / median above which a row is flagged

try:  # glibc: mallopt for the allocator settings below, malloc_trim
    _libc = ctypes.CDLL("libc.so.6")
except OSError:
    _libc = None


MEMORY_MMAP_THRESHOLD = 64 * 1024          # while measuring peak memory (see the module docstring)
TIMING_MMAP_THRESHOLD = 32 * 1024 * 1024   # glibc's own ceiling for its dynamic threshold: a normal process


def set_mmap_threshold(nbytes: int, trim_bytes: int | None = None) -> None:
    """Serving every allocation over 64 KiB with mmap makes peak memory show in the resident set, but it
    also makes each fresh tensor page-fault in, which is not how a normal process runs: benchmarks that
    time whole programs (the engine, the demo) switch to TIMING_MMAP_THRESHOLD for their timed runs.
    trim_bytes: M_TRIM_THRESHOLD too (glibc's dynamic mode keeps it at twice the mmap threshold, so a freed
    block at the top of the heap is kept for the next allocation rather than returned and faulted in again)."""
    if _libc is not None:
        _libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
        if trim_bytes is not None:
            _libc.mallopt(-1, trim_bytes)  # M_TRIM_THRESHOLD


def normal_allocator() -> None:
    """glibc as a long-running process ends up configured: blocks up to 32 MiB from the heap, reused."""
    set_mmap_threshold(TIMING_MMAP_THRESHOLD, 2 * TIMING_MMAP_THRESHOLD)


def measuring_allocator() -> None:
    """Every block over 64 KiB mmapped, freed ones returned, so the resident set follows live allocations (for
    whole-process peaks such as bench_trainer --memory; peak_extra_memory does not need it)."""
    set_mmap_threshold(MEMORY_MMAP_THRESHOLD, 128 * 1024)


# Timed calls run under the normal allocator. Until 2026-12-01 the module set the 64 KiB threshold on import (for the
# resident-set memory measure of the time) and left it for the timed calls too: a provider that allocates a large
# temporary per call (TRL's selective_log_softmax) then page-faulted it in afresh every call, 148 ms against 64 ms
# under this setting at [8, 256, 32000] float32 on one thread, which inflated the speed-ups over it
# (bench/NOTES-logprobs.md).
normal_allocator()


def malloc_trim() -> bool:
    """Give the free top and free pages of glibc's heaps back to the system (False where there is no glibc)."""
    if _libc is None:
        return False
    _libc.malloc_trim(0)
    return True


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
        times.append(_time_once(fn, device))
        if i >= 2 and time.perf_counter() - start_all > max_seconds:
            break
    return statistics.median(times)


def peak_extra_memory(fn: Callable[[], object], *, device: str = "cpu") -> int | None:
    """Bytes of memory the call needed beyond what was allocated before it (None if unmeasurable).

    CUDA: torch.cuda.max_memory_allocated() during the call minus memory allocated before it.
    CPU: the same idea for torch's CPU allocator, from the profiler's allocation events: the running sum of
    the bytes allocated and freed inside the call, at its highest. The profiler sees the calling thread and
    threads that carry its state (alignfast's tile workers do; ATen's OpenMP workers and other Python threads
    do not, though ATen allocates an op's outputs on the calling thread). None when a profiler is already
    running: a nested one would cancel its trace. One unmeasured call runs first inside the same
    profile, so that what the call replaces (a gradient from the previous call) was allocated while recording
    and its release is counted. Until 2026-12-01 the CPU measure was the process's resident set (VmHWM - VmRSS),
    which depended on glibc's heap: freed heap blocks stay resident, and with the timed calls under the normal
    allocator the same call read 32 KiB in one run and 250 MiB (its replaced dlogits, counted twice) in another.
    Allocations outside torch's allocator (a library's own scratch buffers) are not counted on either device.
    """
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
    from torch.autograd import profiler as autograd_profiler
    from torch.profiler import ProfilerActivity, profile, record_function

    if autograd_profiler._is_profiler_enabled:  # read at call time: the module sets it while one runs
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
        gc.collect()
        with record_function(_MEASURED):
            out = fn()
            del out
    events = list(prof.profiler.kineto_results.events())
    window = next((e for e in events if e.name() == _MEASURED), None)
    if window is None:
        return None
    inside = sorted((e for e in events
                     if e.name() == "[memory]" and window.start_ns() <= e.start_ns() <= window.end_ns()),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for e in inside:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


_MEASURED = "bench.harness.measured_call"


def peak_resident_growth(fn: Callable[[], object], *, device: str = "cpu") -> int | None:
    """Bytes by which the process's resident set rose above its level before the call, at its highest (CPU only;
    None on CUDA or where /proc/self/clear_refs cannot reset the high-water mark).

    For whole-program calls (a generation run, a training step of a large model): the profiler that
    peak_extra_memory reads records every op, and a per-prompt `generate` over 256 prompts recorded ~24 GB of
    events and was killed for memory (bench_engine, 2026-12-01). This reads two numbers instead: VmHWM, reset
    just before the call, minus VmRSS before it. It counts everything the process touches (torch's tensors, a GEMM
    library's scratch, Python objects), under the measuring allocator, which returns freed blocks of 64 KiB or
    more to the system at once; a freed smaller block stays resident and is counted as if still live."""
    if device.startswith("cuda"):
        return None
    gc.collect()
    malloc_trim()
    measuring_allocator()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        before = _read_status_kib("VmRSS")
        out = fn()
        peak = _read_status_kib("VmHWM")
        del out
    except OSError:
        return None
    finally:
        normal_allocator()
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


MEMORY_MEASURES = {"events": peak_extra_memory, "resident": peak_resident_growth}


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of xs (inclusive method: with 5 samples, the 2nd, 3rd and 4th smallest)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, med, q3


@dataclass
class Row:
    shape: str
    provider: str
    seconds: float | None            # median over rounds of each round's median
    peak_bytes: int | None
    extra: dict = field(default_factory=dict)
    error: str | None = None
    samples: list = field(default_factory=list)   # seconds per round
    ratios: dict = field(default_factory=dict)    # baseline -> (q1, median, q3) of the per-round speed-ups

    @property
    def spread(self) -> float | None:
        """IQR / median of the per-round times (None with fewer than 2 rounds)."""
        if len(self.samples) < 2 or not self.seconds:
            return None
        q1, med, q3 = quartiles(self.samples)
        return (q3 - q1) / med


def worst_spread(r: Row) -> float:
    """The larger of the row's time spread and the spread of its speed-ups (IQR / median)."""
    worst = r.spread or 0.0
    for q1, med, q3 in r.ratios.values():
        worst = max(worst, (q3 - q1) / med if med else 0.0)
    return worst


def _error_text(err: Exception) -> str:
    text = str(err).splitlines()[0][:80] if str(err) else ""
    return f"{type(err).__name__}: {text}"


CLOCKS = {"wall": "perf_counter", "cpu": "process_time"}  # functions of the time module, looked up per call


def _time_once(fn: Callable[[], object], device: str, clock: str = "wall") -> float:
    """Seconds of one call: CUDA events around it on a GPU (the host returns before the kernels finish),
    on CPU the clock named by `clock` (CLOCKS)."""
    if device.startswith("cuda"):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    now = getattr(time, CLOCKS[clock])
    t0 = now()
    fn()
    return now() - t0


def _timed(fn: Callable[[], object], device: str, reps: int, clock: str = "wall") -> float:
    return statistics.median(_time_once(fn, device, clock) for _ in range(reps))


def _timed_work(fn: Callable[[], object], device: str, reps: int, clock: str = "wall") -> tuple[float, float]:
    """(seconds, units of work) of the call with the median seconds per unit; fn returns its units of work."""
    calls = []
    for _ in range(reps):
        done: list[object] = []
        seconds = _time_once(lambda: done.append(fn()), device, clock)
        work = done[0]
        if not isinstance(work, (int, float)) or isinstance(work, bool) or work <= 0:
            raise ValueError(f"with work=True a provider's call must return its units of work (> 0), got {work!r}")
        calls.append((seconds / work, seconds, float(work)))
    calls.sort()
    _, seconds, work = calls[(len(calls) - 1) // 2]
    return seconds, work


class ProviderMismatch(SystemExit):
    """A provider's output differs from the first provider's (run_rounds' `check`): exits with this one line."""


@dataclass
class Check:
    """What run_rounds' `check` compares: every provider's output in the first round against the first provider's,
    with torch.testing.assert_close (dtypes may differ; the tolerance is that of the least precise of the two and
    `dtype`, the inputs' dtype: float32 log-probs computed from bfloat16 logits carry bfloat16's error).

    tolerances: dtype -> (rtol, atol); a dtype not listed gets assert_close's default for it.
    skip: provider -> why its output is not comparable (another input layout, the opposite sign, ...).
    groups: provider -> group; a provider is compared with the first provider of its group (default group "": the
    first provider), e.g. the gradients of a loss that adds the entropy with those of other such losses only.
    view: (output, the round's inputs) -> what to compare (e.g. only the positions a mask keeps).
    Outputs are flattened to their tensors (tuples, lists, named tuples; None left out). Each provider is compared
    with the first of its group on the tensors both return, and also with the first earlier provider of its group
    that returns as many tensors as it does (so "+entropy" rows are checked on their entropy too)."""

    tolerances: dict = field(default_factory=dict)
    skip: dict = field(default_factory=dict)
    view: Callable[[object, object], object] | None = None
    dtype: torch.dtype | None = None
    groups: dict = field(default_factory=dict)

    def tensors(self, out, inp) -> list[torch.Tensor]:
        out = self.view(out, inp) if self.view is not None else out
        found: list[torch.Tensor] = []

        def walk(x):
            if isinstance(x, torch.Tensor):
                found.append(x.detach())
            elif isinstance(x, (tuple, list)):
                for y in x:
                    walk(y)
        walk(out)
        return found

    def compare(self, shape: str, name: str, got: list[torch.Tensor], first: tuple[str, list[torch.Tensor]],
                same: tuple[str, list[torch.Tensor]] | None) -> None:
        pairs = [(first[0], list(zip(got, first[1])))]
        if same is not None and same[0] != first[0]:
            pairs.append((same[0], list(zip(got, same[1]))))
        if not got or not first[1]:
            raise ProviderMismatch(f"bench: {shape}: {name!r} or {first[0]!r} returned no tensor to compare "
                                   f"(return the output from the timed call, or list the provider in Check.skip)")
        for other, zipped in pairs:
            for i, (a, b) in enumerate(zipped):
                dtypes = (a.dtype, b.dtype) + ((self.dtype,) if self.dtype is not None else ())
                dtype = min(dtypes, key=lambda d: -torch.finfo(d).eps if d.is_floating_point else 0)
                rtol, atol = self.tolerances.get(dtype, (None, None))
                try:
                    torch.testing.assert_close(a, b.to(a.device), rtol=rtol, atol=atol, check_dtype=False,
                                               equal_nan=True)
                except AssertionError as err:
                    detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:300]
                    raise ProviderMismatch(f"bench: {shape}: provider {name!r} disagrees with {other!r} (output "
                                           f"tensor {i}): {detail}") from None


def run_rounds(shape: str, providers: dict[str, Callable], *, inputs: Callable[[int], object] | None = None,
               baselines: tuple[str, ...] = (), device: str = "cpu", rounds: int = ROUNDS, reps: int = 1,
               warmup: int = 1, measure_memory: bool = True, clock: str = "wall", work: bool = False,
               memory: str = "events", round_warmup: int | None = None, check: Check | None = None) -> list[Row]:
    """Time providers round-robin over `rounds` rounds; see the module docstring.

    With `inputs` (round index -> inputs, drawn afresh each round), providers map name -> factory(inputs)
    returning the zero-argument callable to time on them. Without it, factory() is called once and its
    callable reused (for whole-program providers that own their state). `warmup` untimed calls run in the
    first round (compilation, caches), `round_warmup` in each later one (default: 1 on CUDA, 0 on CPU, where the
    rows time one call per round and a warm-up would double the run). `reps`: odd. Peak extra memory is measured
    once, in the last round, outside the timed calls. A provider that raises (not installed, out of memory, unsupported) gets a row with its
    error and is not run again, so the table says what could not run rather than silently dropping it.
    `baselines`: providers to which every row's per-round speed-up is computed. `clock`: "wall" or "cpu"
    (CPU devices only; see the module docstring).

    `work`: each call returns the units of work it did (tokens generated), for providers whose work differs from
    call to call (sampled completions end at random lengths). The per-round speed-up then compares throughput,
    (w_p / t_p) / (w_b / t_b) for provider p and baseline b in the same round, not seconds; each row's
    extra["work"] is the median work per call over rounds.

    `memory`: how peak memory is measured, "events" (peak_extra_memory: torch's allocations, from the profiler) or
    "resident" (peak_resident_growth: the process's resident set, for calls too long to profile). A callable with
    a `setup_peak_bytes` attribute (a CUDA graph, whose pool is allocated when it is captured, outside any call)
    reports at least that much.

    `check`: compare the providers' outputs in the first round (Check); a mismatch raises ProviderMismatch.
    """
    if reps < 1 or reps % 2 == 0:
        raise ValueError(f"reps must be odd (a median of an even count averages a cold and a warm call), got {reps}")
    if round_warmup is None:
        round_warmup = 1 if device.startswith("cuda") else 0
    if memory not in MEMORY_MEASURES:
        raise ValueError(f"memory must be one of {sorted(MEMORY_MEASURES)}, got {memory!r}")
    if clock not in CLOCKS or (clock != "wall" and device.startswith("cuda")):
        raise ValueError(f"clock must be one of {sorted(CLOCKS)} ('cpu' on CPU devices only), got {clock!r}")
    names = list(providers)
    samples: dict[str, list[float]] = {n: [] for n in names}
    done: dict[str, list[float]] = {n: [] for n in names}  # units of work per round (all 1.0 unless `work`)
    errors: dict[str, str] = {}
    peaks: dict[str, int | None] = {}
    cached: dict[str, Callable[[], object]] = {}
    compared: list[tuple[str, list[torch.Tensor]]] = []  # (provider, its first-round output), in order
    for r in range(rounds):
        inp = inputs(r) if inputs is not None else None
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if name in errors:
                continue
            try:
                if inputs is not None:
                    fn = providers[name](inp)
                else:
                    fn = cached.get(name) or cached.setdefault(name, providers[name]())
                untimed = warmup if r == 0 else round_warmup
                if r == 0 and check is not None and name not in check.skip:
                    for _ in range(max(untimed, 1) - 1):
                        fn()
                    got = check.tensors(fn(), inp)
                    group = [c for c in compared if check.groups.get(c[0], "") == check.groups.get(name, "")]
                    if group:
                        same = next((c for c in group if len(c[1]) == len(got)), None)
                        check.compare(shape, name, got, group[0], same)
                    compared.append((name, got))
                else:
                    for _ in range(untimed):
                        fn()
                _sync(device)
                if work:
                    seconds, units = _timed_work(fn, device, reps, clock)
                else:
                    seconds, units = _timed(fn, device, reps, clock), 1.0
                samples[name].append(seconds)
                done[name].append(units)
                if measure_memory and r == rounds - 1:
                    peak = MEMORY_MEASURES[memory](fn, device=device)
                    setup = getattr(fn, "setup_peak_bytes", None)
                    peaks[name] = max(peak, setup) if peak is not None and setup is not None else peak
                del fn
            except Exception as err:  # noqa: BLE001 - recorded in the table
                errors[name] = _error_text(err)
            finally:
                gc.collect()
        del inp
        compared.clear()
        gc.collect()
    rows = []
    for name in names:
        if name in errors:
            rows.append(Row(shape, name, None, None, error=errors[name]))
            continue
        row = Row(shape, name, statistics.median(samples[name]), peaks.get(name), samples=samples[name])
        if work:
            row.extra["work"] = f"{statistics.median(done[name]):.0f}"
        for base in baselines:
            if base in samples and base not in errors and samples[base]:
                # seconds per unit of work, per round: the plain time ratio when every unit count is 1
                per_round = [(b / wb) / (s / ws) for b, wb, s, ws in
                             zip(samples[base], done[base], samples[name], done[name])]
                row.ratios[base] = quartiles(per_round)
        rows.append(row)
    return rows


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_ratio(q: tuple[float, float, float]) -> str:
    q1, med, q3 = q
    return f"{med:.2f}x ({q1:.2f}-{q3:.2f})"


def format_table(rows: list[Row], *, baseline: str, extra_columns: tuple[str, ...] = (),
                 also_vs: tuple[str, ...] = ()) -> str:
    """Markdown table. 'speed-up vs X' = X's time / the provider's, per round, as "median (q1-q3)" over
    rounds (higher is faster); rows built without rounds show the ratio of medians. 'spread' flags a row
    whose time or speed-up IQR exceeds SPREAD_WARNING of its median."""
    header = ["shape", "provider", "median ms", "IQR ms", f"speed-up vs {baseline}",
              *[f"vs {b}" for b in also_vs], "peak extra mem", *extra_columns, "spread"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    medians = {(r.shape, r.provider): r.seconds for r in rows if r.seconds}
    for r in rows:
        if r.seconds is None:
            cells = [r.shape, r.provider, "failed", "", r.error or "", *["" for _ in also_vs], "",
                     *["" for _ in extra_columns], ""]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        ratio_cells, worst = [], worst_spread(r)
        for base in (baseline, *also_vs):
            if base in r.ratios:
                ratio_cells.append(_fmt_ratio(r.ratios[base]))
            elif medians.get((r.shape, base)):
                ratio_cells.append(f"{medians[(r.shape, base)] / r.seconds:.2f}x")
            else:
                ratio_cells.append("n/a")
        iqr = (f"{quartiles(r.samples)[0] * 1e3:.3f}-{quartiles(r.samples)[2] * 1e3:.3f}"
               if len(r.samples) >= 2 else "")
        flag = f"WARNING {worst:.0%}" if worst > SPREAD_WARNING else (f"{worst:.0%}" if r.samples else "")
        cells = [r.shape, r.provider, f"{r.seconds * 1e3:.3f}", iqr, *ratio_cells, _fmt_bytes(r.peak_bytes),
                 *[str(r.extra.get(c, "")) for c in extra_columns], flag]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread_note(rows: list[Row]) -> str:
    """A sentence for the notes when any row is flagged (empty otherwise)."""
    n = sum(1 for r in rows if r.seconds and worst_spread(r) > SPREAD_WARNING)
    if not n:
        return ""
    return (f"WARNING: {n} row(s) have a time or speed-up IQR above {SPREAD_WARNING:.0%} of the median: the "
            f"machine was too busy for those figures to be more than indicative.")


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min), {usable_cores()} usable cores"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; os.cpu_count() counts the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
    """HEAD's short hash, with "+uncommitted" when files other than Markdown (RESULTS.md, the notes) differ from
    it or are new and not ignored (a new bench script): such a run measured code that commit does not hold."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=here, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], capture_output=True,
                                 text=True, cwd=here, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = [line for line in changed if not line.rstrip().endswith(".md")]
    return head + ("+uncommitted" if dirty else "")


def append_results(title: str, table: str, *, device: str = "cpu", notes: str = "", rounds: int | None = None,
                   timing: str | None = None) -> None:
    """Append a dated section (title, device, commit, table, notes) to bench/RESULTS.md; rounds: how many
    interleaved rounds the medians are of (default: the harness's ROUNDS or more); timing: what the numbers are
    instead, for a bench that does not time interleaved rounds (e.g. "one run per backend")."""
    fast, what = backend(device)
    if not fast:
        raise SystemExit(f"bench: not recording with {what}: the alignfast rows timed the reference")
    stamp = datetime.date.today().isoformat()
    how_many = f"{rounds}" if rounds is not None else f"{ROUNDS}+"
    section = [f"\n## {QUICK_TITLE if _quick_run else ''}{title}\n",
               f"{stamp}, commit {git_commit()}, {device_description(device)}, {what}; {load_average()} when recorded; "
               f"{timing or f'median of {how_many} interleaved rounds'}\n", "", table, ""]
    if notes:
        section += [notes, ""]
    with open(RESULTS, "a") as f:
        f.write("\n".join(section))


QUICK_TITLE = "Quick run (smaller shapes; never quoted by the README): "
_quick_run = False


def mark_quick_run(quick: bool) -> None:
    """Sections appended from now on are a --quick run's: titled QUICK_TITLE + the full run's title."""
    global _quick_run
    _quick_run = bool(quick)


def refuse_unrecordable(parser, args) -> None:
    """Before a bench runs with --record: parser.error (exit 2, one line) when alignfast's ops would not run their
    kernels (backend()). A --quick run (smaller shapes, fewer rounds or reps, no torch.compile) is recorded under
    its own titles (QUICK_TITLE + the full run's), so the README, which quotes the newest section of a full run's
    title, never quotes it; a GPU session with time for the quick shapes alone still files what it measured."""
    if not getattr(args, "record", False):
        return
    mark_quick_run(getattr(args, "quick", False))
    fast, what = backend(getattr(args, "device", "cpu"))
    if not fast:
        parser.error(f"--record with {what}: the alignfast rows would time the reference, not the kernels")


def backend(device: str = "cpu") -> tuple[bool, str]:
    """(whether every alignfast op runs its kernel on `device`, a description for the stamp): the backend that
    alignfast.ops picks (ALIGNFAST_BACKEND) and the implementations `python -m alignfast.info` lists."""
    from alignfast.ops import _library  # importing alignfast.ops defines every op

    kind = "cuda" if device.startswith("cuda") else "cpu"
    try:
        chosen = _library.current_backend()
    except ValueError as err:
        return False, f"alignfast backend unknown ({err})"
    impls = sorted({_library.describe(name, kind)[0] for name, info in _library.OPS.items() if info.public})
    fast = chosen != "reference" and "reference" not in impls
    return fast, f"alignfast backend {chosen} ({', '.join(impls)} on {kind})"
