"""`alignfast bench`: run the microbenchmarks in the source checkout's bench/ folder and print their tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alignfast.cli.errors import CLIError

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def available() -> list[str]:
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def run(names: list[str], *, device: str, record: bool, quick: bool) -> int:
    found = available()
    if not found and BENCH_DIR.is_dir():
        raise CLIError(f"no bench_*.py scripts in {BENCH_DIR}")
    if not found:
        raise CLIError(f"no benchmarks found: `alignfast bench` runs the scripts in a source checkout's bench/ "
                       f"folder (looked in {BENCH_DIR}); clone the repository and install it with the README's command")
    unknown = [n for n in names if n not in found]
    if unknown:
        raise CLIError(f"unknown benchmark '{unknown[0]}' (available: {', '.join(found)})")
    import importlib.util

    missing = [m for m in ("trl", "liger_kernel") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"alignfast bench: {' and '.join(missing)} not installed: their baseline rows will say so "
              "(pip install -e '.[bench]' to measure against them)", file=sys.stderr)
    status = 0
    for name in names or found:
        cmd = [sys.executable, "-m", f"bench.bench_{name}", "--device", device]
        if record:
            cmd.append("--record")
        if quick:
            cmd.append("--quick")
        print(f"\n=== bench {name}: {' '.join(cmd[1:])}", flush=True)
        done = subprocess.run(cmd, cwd=BENCH_DIR.parent, env={**os.environ})
        if done.returncode != 0:
            print(f"alignfast: bench {name} exited with {done.returncode}", file=sys.stderr)
            status = done.returncode
    if record:
        # The README's performance table quotes RESULTS.md; regenerate it so no README number is typed by hand.
        done = subprocess.run([sys.executable, "-m", "bench.readme_table", "--write"], cwd=BENCH_DIR.parent,
                              env={**os.environ})
        status = status or done.returncode
    return status
