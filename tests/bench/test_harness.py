"""bench/harness.py's rounds and bench/readme_table.py: the machinery that keeps one noisy run out of the README.

Timing is replaced by a scripted clock, so these tests check the bookkeeping (round-robin order, a fresh input
draw per round, per-round ratios, medians, IQRs, the spread warning) and never measure anything."""

import pytest

from bench import harness, readme_table


class ScriptedClock:
    """perf_counter() for providers whose call durations are scripted per (provider, round)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = ScriptedClock()
    monkeypatch.setattr(harness.time, "perf_counter", c)
    return c


def test_rounds_interleave_draw_fresh_inputs_and_ratio_per_round(clock):
    # Round r: the baseline takes 10 * load[r] ms and the fast provider 2 * load[r] ms: load hits both, so the
    # per-round ratio is exactly 5 although the times vary 4x.
    load = [1.0, 4.0, 1.0, 2.0, 1.0]
    calls, draws = [], []

    def provider(name, ms):
        def factory(inp):
            def call():
                calls.append((name, inp))
                clock.now += ms * load[inp] / 1e3
            return call
        return factory

    def inputs(r):
        draws.append(r)
        return r

    rows = harness.run_rounds("s", {"base": provider("base", 10), "fast": provider("fast", 2)}, inputs=inputs,
                              baselines=("base",), rounds=5, reps=1, warmup=1, measure_memory=False)
    assert draws == [0, 1, 2, 3, 4]
    assert calls[:4] == [("base", 0)] * 2 + [("fast", 0)] * 2  # round 0: a warm-up call, then the timed one
    assert [c for c in calls if c[1] == 1] == [("fast", 1), ("base", 1)]  # the order rotates each round
    by = {r.provider: r for r in rows}
    assert by["fast"].samples == pytest.approx([2e-3 * x for x in load])
    assert by["fast"].seconds == pytest.approx(2e-3)
    assert by["fast"].ratios["base"] == pytest.approx((5.0, 5.0, 5.0))
    assert by["base"].spread == pytest.approx((2.0 - 1.0) / 1.0)  # q1 1, median 1, q3 2
    table = harness.format_table(rows, baseline="base")
    fast_line = next(line for line in table.splitlines() if "| fast |" in line)
    assert "5.00x (5.00-5.00)" in fast_line and "WARNING" in fast_line  # its time spread is large
    assert "WARNING" in harness.spread_note(rows)


def test_cpu_clock_times_process_time(monkeypatch):
    """clock="cpu" (bench --clock cpu) reads time.process_time, not perf_counter; memory is measured as on the wall
    clock (peak_extra_memory reads torch's allocation events, whatever the allocator's setting)."""
    cpu = ScriptedClock()
    monkeypatch.setattr(harness.time, "process_time", cpu)
    monkeypatch.setattr(harness.time, "perf_counter", lambda: 0.0)

    def provider(ms):
        def factory(inp):
            def call():
                cpu.now += ms / 1e3
            return call
        return factory

    rows = harness.run_rounds("s", {"base": provider(6), "fast": provider(2)}, inputs=lambda r: r,
                              baselines=("base",), rounds=5, clock="cpu")
    by = {r.provider: r for r in rows}
    assert by["fast"].seconds == pytest.approx(2e-3) and by["fast"].ratios["base"] == pytest.approx((3.0,) * 3)
    assert by["fast"].peak_bytes is not None
    with pytest.raises(ValueError, match="clock"):
        harness.run_rounds("s", {"a": provider(1)}, inputs=lambda r: r, device="cuda", clock="cpu")


def test_speedups_are_per_round_not_a_ratio_of_medians(clock):
    """Round 2 slows the fast provider alone (2.5x): the per-round ratios are 5, 5, 2, 5, 5 (median 5), while the
    ratio of the medians would be 10 / 4 = 2.5. Only the per-round ratio cancels load that hits both providers."""
    base_ms, fast_ms = [10, 40, 10, 20, 10], [2, 8, 5, 4, 2]

    def provider(times):
        def factory(r):
            def call():
                clock.now += times[r] / 1e3
            return call
        return factory

    rows = harness.run_rounds("s", {"base": provider(base_ms), "fast": provider(fast_ms)}, inputs=lambda r: r,
                              baselines=("base",), rounds=5, warmup=0, measure_memory=False)
    fast = next(r for r in rows if r.provider == "fast")
    assert fast.ratios["base"] == pytest.approx((5.0, 5.0, 5.0))
    assert fast.seconds == pytest.approx(4e-3)  # the median time is still the plain median over rounds


def test_with_work_the_speedup_compares_throughput_per_round(clock):
    """Sampled generation ends at random lengths, so providers do different work per call. Round r: the baseline
    makes base_tokens[r] tokens at 1 ms each, the fast provider fast_tokens[r] at 0.25 ms each: its throughput is
    4x in every round although its seconds ratio swings from 1.6x to 8x."""
    base_tokens, fast_tokens = [100, 200, 100, 50, 100], [250, 100, 200, 100, 50]

    def provider(tokens, ms_per_token):
        def factory(r):
            def call():
                clock.now += tokens[r] * ms_per_token / 1e3
                return tokens[r]
            return call
        return factory

    rows = harness.run_rounds("s", {"base": provider(base_tokens, 1.0), "fast": provider(fast_tokens, 0.25)},
                              inputs=lambda r: r, baselines=("base",), rounds=5, warmup=0, measure_memory=False,
                              work=True)
    fast = next(r for r in rows if r.provider == "fast")
    assert fast.ratios["base"] == pytest.approx((4.0, 4.0, 4.0))
    assert fast.extra["work"] == "100"  # the median tokens per call
    assert fast.seconds == pytest.approx(25e-3)

    with pytest.raises(ValueError, match="units of work"):
        harness._timed_work(lambda: None, "cpu", 1)
    rows = harness.run_rounds("s", {"none": lambda r: (lambda: None)}, inputs=lambda r: r, rounds=5, warmup=0,
                              measure_memory=False, work=True)
    assert rows[0].seconds is None and "units of work" in rows[0].error  # reported in the table, not dropped


def test_importing_the_harness_sets_the_normal_allocator_and_the_rounds_keep_it(monkeypatch, clock):
    """A provider that allocates a large temporary per call must not page-fault it in afresh on every timed call
    (the 64 KiB mmap threshold the harness once set on import did that to TRL's loop). In a fresh interpreter,
    with glibc's mallopt recorded: the import leaves the 32 MiB threshold; then the rounds change nothing."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import ctypes\n"
        "import torch  # loads its own libraries through ctypes: before the fake below\n"
        "calls = []\n"
        "class FakeLibc:\n"
        "    def mallopt(self, param, value): calls.append((param, value)); return 1\n"
        "    def malloc_trim(self, pad): return 1\n"
        "ctypes.CDLL = lambda name, *a, **k: FakeLibc()\n"
        "from bench import harness\n"
        "print([v for p, v in calls if p == -3][-1])\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) == harness.TIMING_MMAP_THRESHOLD, out.stdout + out.stderr

    state, seen = {"threshold": harness.TIMING_MMAP_THRESHOLD}, []
    monkeypatch.setattr(harness, "set_mmap_threshold", lambda n, trim=None: state.update(threshold=n))

    def factory(r):
        return lambda: seen.append(state["threshold"])

    harness.run_rounds("s", {"a": factory}, inputs=lambda r: r, rounds=5, warmup=1, measure_memory=True)
    assert len(seen) == 6 + 2  # warm-up, 5 timed calls, and the memory measure's two calls
    assert set(seen) == {harness.TIMING_MMAP_THRESHOLD}


def test_peak_extra_memory_counts_what_a_call_adds_not_what_it_replaces():
    """The CPU measure is the most bytes torch's allocator held during the call beyond what it held at the start:
    a temporary counts, the result of the previous call that this call frees and replaces (a gradient) does not,
    whatever glibc's heap looked like (the resident-set measure read 32 KiB or 250 MiB for the same call)."""
    import torch

    x = torch.randn(256, 1024, requires_grad=True)  # 1 MiB

    def fwd_bwd():
        x.grad = None
        (torch.log_softmax(x * 2, -1) * 3).sum().backward()

    fwd_bwd()  # x.grad exists before the measure, as after a timed call
    extra = harness.peak_extra_memory(fwd_bwd)
    mib = 1 << 20
    # x * 2, log_softmax's output and its backward's buffers are temporaries; x.grad replaces the old one
    assert 2 * mib <= extra <= 5 * mib, extra / mib

    held = []
    assert harness.peak_extra_memory(lambda: held.append(torch.empty(4 * mib, dtype=torch.uint8))) >= 4 * mib
    assert harness.peak_extra_memory(lambda: None) == 0


def test_a_failing_provider_gets_a_row_with_its_error_and_is_not_retried(clock):
    tries = []

    def broken(inp):
        tries.append(inp)
        raise RuntimeError("not installed")

    rows = harness.run_rounds("s", {"ok": lambda inp: (lambda: None), "broken": broken}, inputs=lambda r: r,
                              rounds=5, measure_memory=False)
    assert tries == [0]
    row = next(r for r in rows if r.provider == "broken")
    assert row.seconds is None and "not installed" in row.error
    assert "failed" in harness.format_table(rows, baseline="ok")


def test_readme_generator_reads_what_the_harness_writes(clock):
    load = [1.0, 1.2, 0.9, 1.1, 1.0]
    rnd = iter(range(100))

    def provider(ms):
        def factory(inp):
            def call():
                clock.now += ms * load[inp] / 1e3
            return call
        return factory

    rows = harness.run_rounds("64x1024", {"TRL loop": provider(30), "verl loop": provider(60),
                                          "alignfast": provider(0.5)},
                              inputs=lambda r: next(rnd) % 5, baselines=("TRL loop", "verl loop"), rounds=5,
                              measure_memory=False)
    table = harness.format_table(rows, baseline="TRL loop", also_vs=("verl loop",))
    results = f"# Benchmark results\n\n## compute_advantages (cpu)\n\n2026-11-30, commit abc1234, CPU x; " \
              f"load average 7.5 / 6.0 / 5.0 (1 / 5 / 15 min), 2 CPUs when recorded\n\n\n{table}\n\nnotes\n"
    out = readme_table.render(results)
    line = next(line for line in out.splitlines() if line.startswith("| `compute_advantages`"))
    assert "60.00× TRL loop (60.00–60.00)" in line and "120.00× verl loop" in line
    assert "2026-11-30 abc1234, load 7.5" in line
    assert "**load 7.5 on 2 CPUs: indicative only**" in line  # recorded at a load above the cores it had
    assert "not recorded yet" in out  # specs with no section say so instead of inventing a number


def test_goals_need_the_lower_quartile_and_an_unmarked_row():
    results = ("## token_logprobs, forward, temperature 1.0\n\n2026-11-30, commit abc, CPU\n\n"
               "| shape | provider | median ms | IQR ms | speed-up vs trl selective_log_softmax | "
               "vs torch.compile reference | vs torch.compile reference +entropy | peak extra mem | spread |\n"
               "|---|---|---|---|---|---|---|---|---|\n"
               "| 8x256x32000 float32 | alignfast | 1 | 1-1 | 2.50x (2.40-2.60) | 1.20x (1.10-1.30) | n/a | 1 KiB | 5% |\n")
    line = next(line for line in readme_table.render(results).splitlines()
                if "forward | 8×256×32000 float32" in line)
    assert "≥2× trl selective_log_softmax: met;" in line
    assert "≥1.3× torch.compile reference: **not met**" in line
    # the median reaches the goal but the lower quartile does not
    line = _fwd_line(_section("token_logprobs, forward, temperature 1.0", "2026-11-02, commit c", "2.10x (1.25-2.40)"))
    assert "≥2× trl selective_log_softmax: met at the median only (IQR low 1.25×)" in line
    assert readme_table.verdict((2.5, None, None), 2.0, []) == "met at the median only (no rounds)"
    assert readme_table.verdict((2.5, 2.1, 2.9), 2.0, ["load 3.0 on 2 cores"]) == \
        "met at the median only (load 3.0 on 2 cores)"
    assert readme_table.verdict(None, 2.0, []) == "**not met**"


def test_readme_performance_table_is_the_generated_one():
    """README.md's table is exactly what `python -m bench.readme_table` makes of bench/RESULTS.md (regenerate
    it with `python -m bench.readme_table --write` or `alignfast bench --record`)."""
    readme = readme_table.README.read_text()
    assert readme_table.BEGIN in readme and readme_table.END in readme
    assert readme_table.readme_table(readme) == readme_table.render(readme_table.RESULTS.read_text())


def _section(title, stamp, ratio, spread="5%"):
    return (f"## {title}\n\n{stamp}, CPU\n\n"
            "| shape | provider | median ms | IQR ms | speed-up vs trl selective_log_softmax | "
            "vs torch.compile reference | vs torch.compile reference +entropy | peak extra mem | spread |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
            f"| 8x256x32000 float32 | alignfast | 1 | 1-1 | {ratio} | 1.50x (1.40-1.60) | n/a | 1 KiB | {spread} |\n\n")


def _fwd_line(results):
    return next(line for line in readme_table.render(results).splitlines()
                if line.startswith("| `token_logprobs` forward | 8×256×32000 float32"))


def test_the_newest_section_with_the_row_wins():
    title = "token_logprobs, forward, temperature 1.0"
    results = _section(title, "2026-11-01, commit old", "3.00x (2.90-3.10)") + \
        _section(title, "2026-11-02, commit new", "4.00x (3.90-4.10)")
    line = _fwd_line(results)
    assert "4.00× trl selective_log_softmax (3.90–4.10)" in line and "2026-11-02 new" in line


def test_a_row_the_harness_flagged_is_marked_indicative_in_the_readme():
    line = _fwd_line(_section("token_logprobs, forward, temperature 1.0", "2026-11-02, commit c",
                              "4.00x (2.00-6.00)", spread="WARNING 50%"))
    assert "**spread 50%: indicative only**" in line
    assert "≥2× trl selective_log_softmax: met at the median only (spread 50%)" in line


@pytest.mark.parametrize("stamp, marked", [
    # new stamps: the cores of the process's affinity mask
    ("2026-12-02, commit c, CPU x, 2 threads (torch 2); load average 2.4 / 1.0 / 1.0 (1 / 5 / 15 min), "
     "2 usable cores when recorded", "load 2.4 on 2 cores"),
    ("2026-12-02, commit c, CPU x, 2 threads (torch 2); load average 1.9 / 3.0 / 3.0 (1 / 5 / 15 min), "
     "2 usable cores when recorded", None),
    # older stamps: os.cpu_count()
    ("2026-11-30, commit c, CPU x, 1 threads (torch 2); load average 4.6 / 4.0 / 3.2 (1 / 5 / 15 min), "
     "2 CPUs when recorded", "load 4.6 on 2 CPUs"),
    # hand-written ones without a core count: the thread count
    ("2026-11-30, commit c, CPU x, 1 torch thread (torch 2), load average ~18", "load 18.0 on 1 threads"),
    ("2026-11-22, commit c, CPU x, 1 threads (torch 2)", None),  # no load recorded
])
def test_a_section_recorded_under_load_is_marked_indicative(stamp, marked):
    section = readme_table.Section("t", stamp, [])
    assert readme_table.overloaded(section) == marked
    if marked:
        line = _fwd_line(_section("token_logprobs, forward, temperature 1.0", stamp,
                                  "4.00x (3.90-4.10)"))
        assert f"**{marked}: indicative only**" in line
        assert f"≥2× trl selective_log_softmax: met at the median only ({marked})" in line


def test_the_stamp_records_load_and_usable_cores():
    import os

    text = harness.load_average()
    if text != "load average unknown":
        assert text.endswith(f"{len(os.sched_getaffinity(0))} usable cores")


def test_a_quoted_column_the_section_lacks_is_an_error_not_a_silent_gap():
    results = _section("token_logprobs, forward, temperature 1.0", "2026-11-02, commit c", "4.00x (3.90-4.10)")
    results = results.replace("| vs torch.compile reference |", "| vs something else |", 1)
    with pytest.raises(SystemExit, match="vs torch.compile reference"):
        readme_table.render(results)


def test_peak_extra_memory_stays_out_of_a_running_profile():
    """Inside a user's profile a nested profiler would cancel their trace: the measure says it cannot measure."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]):
        assert harness.peak_extra_memory(lambda: torch.empty(1 << 20)) is None
    assert harness.peak_extra_memory(lambda: torch.empty(1 << 20)) >= 4 << 20


def test_resident_growth_measures_a_call_without_recording_its_ops(monkeypatch):
    """For calls too long to profile (per-prompt generation over hundreds of prompts recorded ~24 GB of profiler
    events): the rise of the resident set over the call. A 256 MiB temporary shows; a call that allocates nothing
    shows (almost) nothing; the timed calls afterwards are back under the normal allocator."""
    import torch

    def big():
        x = torch.ones(64 * 1024 * 1024)  # 256 MiB, freed before the call returns
        return float(x[0])

    thresholds = []
    real = harness.set_mmap_threshold
    monkeypatch.setattr(harness, "set_mmap_threshold", lambda n, *a: (thresholds.append(n), real(n, *a)))
    grown = harness.peak_resident_growth(big)
    assert grown is not None and 240 * 2**20 <= grown <= 320 * 2**20, grown
    assert thresholds == [harness.MEMORY_MMAP_THRESHOLD, harness.TIMING_MMAP_THRESHOLD]
    assert harness.peak_resident_growth(lambda: None) < 16 * 2**20
    assert harness.peak_resident_growth(big, device="cuda") is None

    rows = harness.run_rounds("s", {"big": lambda: big}, rounds=1, warmup=0, memory="resident")
    assert rows[0].peak_bytes >= 240 * 2**20
    with pytest.raises(ValueError, match="memory"):
        harness.run_rounds("s", {"big": lambda: big}, rounds=1, memory="rss")


def test_check_compares_every_provider_with_the_first_in_the_first_round(clock):
    """A provider that computes something else (or an op that fell back to something wrong) is one error naming the
    provider and the row, raised before the other rounds; a skipped provider and another group are left out."""
    import torch

    base = torch.linspace(-3, 3, 64)

    def returning(offset, entropy=False):
        return lambda inp: (lambda: (base + offset, base * 2) if entropy else base + offset)

    providers = {"eager": returning(0.0), "close": returning(1e-7), "+entropy": returning(0.0, entropy=True),
                 "other layout": returning(5.0), "other loss": returning(3.0)}
    check = harness.Check({torch.float32: (1e-5, 1e-6)}, skip={"other layout": "its own draw"},
                          groups={"other loss": "g"})
    rows = harness.run_rounds("s", providers, inputs=lambda r: r, rounds=5, measure_memory=False, check=check)
    assert all(r.seconds is not None for r in rows)

    providers["wrong"] = returning(1e-2)
    with pytest.raises(harness.ProviderMismatch, match=r"^bench: s: provider 'wrong' disagrees with 'eager'"):
        harness.run_rounds("s", providers, inputs=lambda r: r, rounds=5, measure_memory=False, check=check)
    # the tolerance follows the inputs' dtype: bfloat16 inputs allow bfloat16's error in float32 outputs
    loose = harness.Check({torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-2)}, dtype=torch.bfloat16,
                          skip=check.skip, groups=check.groups)
    harness.run_rounds("s", providers, inputs=lambda r: r, rounds=5, measure_memory=False, check=loose)


def test_reps_are_odd_and_cuda_style_rounds_warm_up_every_round(clock):
    calls = []
    factory = {"a": lambda r: (lambda: calls.append(r))}
    with pytest.raises(ValueError, match="odd"):
        harness.run_rounds("s", factory, inputs=lambda r: r, rounds=5, reps=2, measure_memory=False)
    harness.run_rounds("s", factory, inputs=lambda r: r, rounds=5, reps=3, warmup=2, round_warmup=1,
                       measure_memory=False)
    assert [calls.count(r) for r in range(5)] == [2 + 3, 1 + 3, 1 + 3, 1 + 3, 1 + 3]


def test_memory_set_aside_when_a_callable_is_built_counts(clock):
    """A CUDA graph's pool is allocated at capture, outside any call: the row reports it, not ~0."""
    def factory(r):
        def replay():
            return None
        replay.setup_peak_bytes = 123456
        return replay

    rows = harness.run_rounds("s", {"graph": factory}, inputs=lambda r: r, rounds=5)
    assert rows[0].peak_bytes == 123456


def test_record_is_refused_when_the_ops_would_run_the_reference(monkeypatch, capsys):
    from bench import bench_logprobs

    monkeypatch.setenv("ALIGNFAST_BACKEND", "reference")
    fast, what = harness.backend("cpu")
    assert not fast and "alignfast backend reference" in what
    with pytest.raises(SystemExit) as exit_info:
        bench_logprobs.main(["--record"])
    assert exit_info.value.code == 2
    assert "--record with alignfast backend reference" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not recording"):
        harness.append_results("t", "| x |")
    monkeypatch.delenv("ALIGNFAST_BACKEND")
    assert harness.backend("cpu")[0]
