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


@pytest.mark.parametrize("name", bench_cli.available())
def test_every_benchmark_refuses_record_with_quick(name, capsys):
    """A quick run (small shapes, fewer rounds, no torch.compile) would be appended under the full table's title,
    and the README quotes the newest section with that title: --record --quick is one line and exit 2, before
    anything is built or measured."""
    module = importlib.import_module(f"bench.bench_{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--record", "--quick"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--record and --quick together" in err.strip().splitlines()[-1]  # argparse's usage, then the one line


def test_alignfast_bench_refuses_record_with_quick(capsys):
    from alignfast.cli import main

    assert main(["bench", "--record", "--quick", "logprobs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alignfast bench: error:") and "--quick" in err and "\n" not in err
