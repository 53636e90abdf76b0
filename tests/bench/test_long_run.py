"""bench/bench_long_run.py: the memory trace of a long run must cover every step, vary the prompts' lengths (the
point of the bench: row counts that keep changing), and say how many shapes reached oneDNN."""

from __future__ import annotations

import pytest

from bench import bench_long_run
from bench.bench_trainer import PRESETS


@pytest.mark.parametrize("steps, expected", [
    (1, [(1, 1)]),
    (3, [(1, 1), (2, 2), (3, 3)]),
    (10, [(1, 2), (3, 5), (6, 8), (9, 10)]),
    (20, [(1, 5), (6, 10), (11, 15), (16, 20)]),
    (200, [(1, 10), (11, 50), (51, 100), (101, 150), (151, 200)]),
])
def test_windows_cover_every_step_once_in_order(steps, expected):
    got = bench_long_run.windows(steps)
    assert got == expected
    covered = [s for a, b in got for s in range(a, b + 1)]
    assert covered == list(range(1, steps + 1))


def test_prompts_vary_in_length_within_the_stated_range():
    prompts = bench_long_run.varied_prompts("cpu-tiny", 200)
    lengths = {len(p.split()) for p in prompts}
    words = PRESETS["cpu-tiny"]["prompt_words"]
    assert min(lengths) >= words // 4 and max(lengths) <= 2 * words
    assert len(lengths) > words  # many distinct lengths, so many distinct token counts per micro-batch
    assert prompts == bench_long_run.varied_prompts("cpu-tiny", 200)  # seeded


def test_a_short_run_reports_every_window_and_the_growth(capsys):
    from bench.bench_trainer import Setup

    table = bench_long_run.run("cpu-tiny", "cpu", 3, Setup(), record=False, exact_rows=4)
    rows = table.splitlines()[2:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["1-1", "2-2", "3-3"]
    for r in rows:
        rss_last, rss_high = (float(c) for c in r.strip("|").split("|")[1:3])
        assert 0 < rss_last <= rss_high
    printed = capsys.readouterr().out
    assert "Growth from step 1 to step 3:" in printed
    assert "to oneDNN" in printed  # the extension is built for the tests (ALIGNFAST_REQUIRE_EXT=1)
