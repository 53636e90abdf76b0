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
