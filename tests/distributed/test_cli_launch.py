"""The commands the README's "Scaling out" section gives, under a real launcher: `torchrun --nproc_per_node 2 -m
alignfast.cli ...` (gloo on CPU) for Align-Pro, Proxy-RLHF and the Aligner. Each process runs the command; the
main process alone writes the run and prints the summary line; the checkpoint records 2 processes. (Parity
with one process is tests/distributed/test_multiprocess.py's.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# the demo configs' global batch of 32 rows per micro-batch, split into 2 x 16 so 2 processes share it
SPLIT = ["--max_steps", "2", "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "2"]
COMMANDS = {
    "align_pro": (["train", "--config", str(CONFIGS / "toy.yaml"), "--data.eval", "null"], "", "PPO steps;"),
    "proxy": (["train", "--method", "proxy", "--config", str(CONFIGS / "proxy_toy.yaml"), "--data.eval", "null"],
              "proxy", "PPO steps of Proxy-RLHF"),
    "aligner": (["aligner", "train", "--config", str(CONFIGS / "aligner_toy.yaml"), "--data.train.limit", "64",
                 "--data.eval.limit", "16"], "", "aligner train: 2 steps"),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_under_torchrun_with_two_processes(tmp_path, name):
    args, sub, summary = COMMANDS[name]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "alignfast.cli",
           *args, "--trainer.output_dir", str(out), *SPLIT]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(summary in line for line in proc.stderr.splitlines()) == 1, proc.stderr[-2000:]  # the main process
    run = out / sub if sub else out
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_step"] == 2
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()][:2] == [1, 2]
    assert (run / "final").is_dir()


def test_every_command_loads_onto_its_own_gpu_under_a_launcher(monkeypatch):
    """`train`, `train --method proxy`, `aligner train`, `eval` and `correct` take their device from
    build.default_device(): under a launcher, cuda:LOCAL_RANK (N processes loading an 8B target onto GPU 0
    first would not fit)."""
    import torch

    from alignfast.cli import build
    from alignfast.trainer import distributed  # noqa: F401 - imported before torch claims a GPU below

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert build.default_device() == "cuda:1"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert build.default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert build.default_device() == "cpu"


def test_a_bad_setting_is_said_once_and_in_the_launchers_summary(tmp_path):
    """Both processes fail on the same unknown key: the line is printed once (not once per process) and the
    launcher's failure summary quotes it instead of 'To enable traceback see ...'."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "alignfast.cli",
           "train", "--config", str(CONFIGS / "toy.yaml"), "--trainer.no_such_key", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    line = "alignfast train: error: unknown key 'trainer.no_such_key'"
    assert proc.returncode != 0
    assert proc.stderr.splitlines().count(line) == 1, proc.stderr[-3000:]
    assert f"traceback : {line}" in proc.stderr, proc.stderr[-3000:]


SAY = "import sys; from alignfast.cli.error_output import print_error; print_error(sys.argv[1])"


def _say_in_two_processes(tmp_path, first: str, second: str, world_size: str = "2") -> str:
    """Two processes with one parent (this test), as a launcher's workers on one node are."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": world_size, "TMPDIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", SAY, line], env={**env, "TORCHELASTIC_ERROR_FILE":
                              str(tmp_path / f"error{i}.json")}, stderr=subprocess.PIPE, text=True)
             for i, line in enumerate((first, second))]
    return "".join(p.communicate(timeout=60)[1] for p in procs)


def test_an_error_only_one_process_meets_is_still_printed(tmp_path):
    said = _say_in_two_processes(tmp_path, "error: same", "error: same")
    assert said.splitlines() == ["error: same"]
    said = _say_in_two_processes(tmp_path, "error: shard 0 is empty", "error: shard 1 is fine")
    assert sorted(said.splitlines()) == ["error: shard 0 is empty", "error: shard 1 is fine"]
    record = json.loads((tmp_path / "error0.json").read_text())
    assert record["message"]["message"] == "error: shard 0 is empty" and int(record["message"]["extraInfo"]["timestamp"])
    # one process, no launcher: printed every time, nothing recorded
    (tmp_path / "error0.json").unlink()
    said = _say_in_two_processes(tmp_path, "error: alone", "error: alone", world_size="1")
    assert said.splitlines() == ["error: alone", "error: alone"] and not (tmp_path / "error0.json").exists()


def test_resume_and_proxy_warnings_are_said_once_under_two_processes(tmp_path):
    """Every process verifies and loads the checkpoint, and every process holds a Proxy-RLHF step's whole rollout:
    their warnings (another step count on resume; a step without any decision) were printed once per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args, sub, _ = COMMANDS["proxy"]
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "alignfast.cli", *args, "--trainer.output_dir", str(out), "--per_device_train_batch_size", "16",
              "--gradient_accumulation_steps", "2", "--target_top_p", "0.01", "--target_temperature", "1.0"]
    first = subprocess.run([*launch, "--max_steps", "1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sum("no decision to make" in line for line in first.stderr.splitlines()) == 1, first.stderr[-3000:]
    again = subprocess.run([*launch, "--max_steps", "2", "--resume"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    rebuilt = [line for line in again.stderr.splitlines() if "learning-rate schedule is rebuilt" in line]
    assert len(rebuilt) == 1, again.stderr[-3000:]
