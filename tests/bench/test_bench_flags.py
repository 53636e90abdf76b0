"""`alignfast bench [--quick] [--record] [--device cpu]` passes the same flags to every bench/bench_*.py: each
script must accept them (bench_trainer rejected --quick, so `alignfast bench --quick` failed on it)."""

import argparse
import importlib

import pytest

from alignfast.cli import bench as bench_cli


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("name", bench_cli.available())
def test_every_benchmark_accepts_the_flags_alignfast_bench_passes(name, monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)  # exits (SystemExit 2) on an unknown flag
        raise _Parsed  # parsed: stop before anything is measured or recorded

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    module = importlib.import_module(f"bench.bench_{name}")
    with pytest.raises(_Parsed):
        module.main(["--device", "cpu", "--record", "--quick"])


@pytest.mark.parametrize("name", ["engine", "demo", "trainer"])
def test_a_recorded_table_needs_the_harness_rounds(name, capsys):
    """A table appended to RESULTS.md has >= harness.ROUNDS interleaved rounds: asking for fewer is refused with
    one line naming the flag, before anything is built or measured."""
    module = importlib.import_module(f"bench.bench_{name}")
    flag = "--reps" if name == "trainer" else "--rounds"
    with pytest.raises(SystemExit) as exit_info:
        module.main([flag, "2", "--record"])
    assert exit_info.value.code == 2
    assert f"{flag} must be >= 5 with --record" in capsys.readouterr().err


def test_the_engine_bench_reports_per_round_throughput_ratios(capsys):
    """A small end-to-end run of bench_engine: every provider runs, and the speed-up cells carry the per-round IQR
    that bench/readme_table.py quotes (tokens/s ratios: the providers' completions differ in length)."""
    from bench import bench_engine, readme_table

    assert bench_engine.main(["--prompts", "4", "--min-len", "4", "--max-len", "12", "--max-new-tokens", "4",
                              "--rounds", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 4 prompts")]
    assert [line.split("|")[2].strip() for line in rows] == ["naive", "padded", "engine"]
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        ratio = readme_table.parse_ratio(cells[4])
        assert ratio is not None and ratio[1] is not None, line  # "1.23x (1.10-1.30)": a median and its IQR
        assert int(cells[7]) > 0  # tokens per call


def test_a_quick_run_is_recorded_under_titles_the_readme_never_quotes(tmp_path, monkeypatch):
    """--record --quick (the GPU session's one call has time for the quick shapes only) appends under "Quick run
    (...): <title>", so the README's table, which quotes the newest section of a full run's title, skips it."""
    from bench import harness, readme_table

    results = tmp_path / "RESULTS.md"
    results.write_text("")
    monkeypatch.setattr(harness, "RESULTS", results)
    monkeypatch.setattr(harness, "backend", lambda device="cpu": (True, "backend fast"))
    parser = argparse.ArgumentParser()
    harness.refuse_unrecordable(parser, argparse.Namespace(record=True, quick=True, device="cpu"))
    try:
        harness.append_results("token_logprobs, forward, temperature 1.0", "| a |\n|---|\n| 1 |")
    finally:
        harness.refuse_unrecordable(parser, argparse.Namespace(record=True, quick=False, device="cpu"))
    text = results.read_text()
    assert "## Quick run (smaller shapes; never quoted by the README): token_logprobs, forward" in text
    titles = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert titles and not any(title.startswith(spec.section) for spec in readme_table.specs() for title in titles)
