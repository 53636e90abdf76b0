"""scripts/gpu_session.sh must fit one device call: a session has 15 minutes of device time, start-up included, and
one call may run 10. The script stops starting work when its budget is spent and kills a stage that overruns, so
the logs and RESULTS.md still come back. Checked here with a stand-in python3 that hangs on one benchmark."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_session.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
echo "fake python $*"
case "$*" in
  *bench.bench_logprobs*--backward*) sleep 60 ;;   # hangs: must be killed at the budget
esac
exit 0
"""


def _run(tmp_path: Path, *args: str, budget: int, min_stage: int, fake_python: str = FAKE_PYTHON,
         path: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    fake = tmp_path / "python3"
    fake.write_text(fake_python)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out), "ALIGNFAST_GPU_BUDGET_S": str(budget),
           "ALIGNFAST_GPU_MIN_STAGE_S": str(min_stage)}
    if path is not None:
        env["PATH"] = path
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


def test_a_hanging_stage_is_killed_at_the_budget_and_the_rest_is_skipped_with_the_logs_kept(tmp_path):
    proc, took = _run(tmp_path, "bench", "quick", budget=6, min_stage=2)
    log = (tmp_path / "out" / "bench.log").read_text()
    assert took < 30, f"the script ran {took:.0f}s past a 6s budget"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # the first benchmark ran with --quick on CUDA, recorded (under quick titles); the hanging one was killed; the
    # rest skipped
    assert "fake python -m bench.bench_logprobs --device cuda --record --quick" in log
    assert "TIMED OUT" in log and "bench.bench_logprobs --device cuda --record --backward --quick" in log
    assert log.count("SKIPPED") == 7, log
    assert (tmp_path / "out" / "RESULTS.md").read_text() == (ROOT / "bench" / "RESULTS.md").read_text()
    assert "status 1" in proc.stdout


def test_every_benchmark_runs_in_priority_order_when_time_allows(tmp_path):
    proc, _ = _run(tmp_path, "bench", "full", budget=60, min_stage=2,
                   fake_python=FAKE_PYTHON.replace("sleep 60", "true"))
    log = (tmp_path / "out" / "bench.log").read_text()
    ran = [line.split(" -m ")[1].split(" (limit")[0] for line in log.splitlines() if line.startswith("== ")]
    assert ran == [
        "bench.bench_logprobs --device cuda --record",
        "bench.bench_logprobs --device cuda --record --backward",
        "bench.bench_linear_logprobs --device cuda --record --backward",
        "bench.bench_advantages --device cuda --record",
        "bench.bench_ppo_loss --device cuda --record",
        "bench.bench_logprobs --device cuda --record --policy-loss",
        "bench.bench_linear_logprobs --device cuda --record",
        "bench.bench_trainer --device cuda --record",
        "bench.bench_engine --device cuda --record --providers padded engine",
    ], log
    assert proc.returncode == 0 and "SKIPPED" not in log and "TIMED OUT" not in log


def test_a_bad_mode_is_refused_with_the_usage(tmp_path):
    proc, _ = _run(tmp_path, "all", "fast", budget=60, min_stage=2)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_a_good_build_goes_on_to_the_tests_and_benchmarks_even_if_the_info_commands_fail(tmp_path):
    """`all`: after the build, alignfast.info and nvidia-smi only inform; a failing one (here: no nvidia-smi on the
    PATH, and an info that exits 1) must not skip the GPU tests and the benchmarks."""
    info_fails = 'case "$*" in *alignfast.info*) exit 1 ;; esac\nexit 0'
    fake = FAKE_PYTHON.replace("sleep 60", "true").replace("exit 0", info_fails)
    env_path = tmp_path / "bin"
    env_path.mkdir()
    for tool in ("bash", "timeout", "tee", "tail", "mkdir", "cp", "cat", "sleep", "true", "dirname"):
        real = shutil.which(tool)
        if real:
            (env_path / tool).symlink_to(real)
    proc, _ = _run(tmp_path, "all", "quick", budget=1000, min_stage=2, fake_python=fake, path=str(env_path))
    out = tmp_path / "out"
    assert "pytest -m gpu or interpret" in (out / "gpu_tests.log").read_text(), proc.stdout + proc.stderr
    bench_log = (out / "bench.log").read_text()
    assert "bench.bench_engine --device cuda --record --providers padded engine --quick (limit 90s" in bench_log
    assert "bench.bench_trainer --device cuda --record --quick (limit 180s" in bench_log  # builds two 0.5B models
    assert (out / "RESULTS.md").exists()
