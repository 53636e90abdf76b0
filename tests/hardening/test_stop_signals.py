"""SIGTERM (what Slurm and Kubernetes send) and SIGINT (Ctrl-C) during `alignfast train` (issue 10 case 10): the
step in progress finishes, a checkpoint is written, the process exits 128+signal with one line saying how to
resume, and --resume continues from that checkpoint. A real subprocess and a real signal, bounded in time.
The SIGINT variant (same code path, another signal number) is marked slow: pytest -m slow tests/hardening."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignfast.trainer import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "configs" / "toy.yaml")
# many short steps, no checkpoint of its own before the signal (save_steps is larger than the run)
RUN = ["--total_episodes", "4000", "--per_device_train_batch_size", "4", "--num_mini_batches", "1",
       "--num_ppo_epochs", "1", "--response_length", "6", "--save_steps", "100000", "--logging_steps", "1000",
       "--data.eval", "null"]


def _steps_done(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_finishes_the_step_checkpoints_and_says_how_to_resume(tmp_path, sig):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "alignfast.cli", "train", "--config", TOY,
                             "--trainer.output_dir", str(out), *RUN], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while _steps_done(out) < 1:  # the loop (and its handlers) is running
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no step within 120 s"
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert proc.returncode == 128 + sig, err[-2000:]
    step = _steps_done(out)
    assert last == (f"alignfast train: stopped by {signal.Signals(sig).name} after step {step} of 1000; checkpoint "
                    f"{out / f'checkpoint-{step}'} written; the same command with --resume continues the run"), last
    ckpt.verify(out / f"checkpoint-{step}")
    assert json.loads((out / f"checkpoint-{step}" / ckpt.STATE_FILE).read_text())["global_step"] == step

    if sig == signal.SIGTERM:  # --resume continues from there (exactness of resume is tested in tests/trainer)
        from alignfast.cli import main

        assert main(["train", "--config", TOY, "--trainer.output_dir", str(out), *RUN[:-4],
                     "--max_steps", str(step + 1), "--resume"]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, step + 2))


def test_second_signal_abandons_and_the_lines_without_a_checkpoint():
    from alignfast.trainer.stop_signals import StopSignals, stop_line

    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; SIG_IGN in a job started with `&`
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGINT) is not before
        stop._handle(signal.SIGTERM, None)
        assert stop.requested and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="SIGINT received twice"):
            stop._handle(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back
    assert stop_line("SIGTERM", 3, 9, None, how="x") == \
        "stopped by SIGTERM after step 3 of 9; no checkpoint written (save_strategy is 'no'): the run cannot be resumed"
    assert stop_line("SIGINT", 3, 9, "out/checkpoint-2", how="--resume").endswith(
        "no checkpoint of this step (save_strategy is 'no'); --resume continues from out/checkpoint-2")


def test_under_a_launcher_the_same_signal_twice_at_once_is_one_request(monkeypatch):
    """Slurm signals every process of the job and torchrun forwards the signal it got too: each worker receives
    SIGTERM twice within milliseconds. That used to count as "stop at once": no checkpoint, and the other rank
    crashed on a closed connection. Under a launcher a repeat within DUPLICATE_WINDOW_S is the same request; a
    repeat after it, or another signal, still stops at once; one process alone keeps the old rule."""
    from alignfast.trainer import stop_signals
    from alignfast.trainer.stop_signals import StopSignals

    clock = [100.0]
    monkeypatch.setattr(stop_signals.time, "monotonic", lambda: clock[0])
    monkeypatch.setenv("LOCAL_RANK", "0")
    with StopSignals() as stop:
        stop._handle(signal.SIGTERM, None)
        clock[0] += 0.01
        stop._handle(signal.SIGTERM, None)  # the launcher's copy: ignored
        assert stop.requested and stop.name == "SIGTERM"
        clock[0] += stop_signals.DUPLICATE_WINDOW_S
        with pytest.raises(KeyboardInterrupt, match="SIGTERM received twice"):
            stop._handle(signal.SIGTERM, None)
    with StopSignals() as stop:
        stop._handle(signal.SIGTERM, None)
        with pytest.raises(KeyboardInterrupt, match="SIGINT received twice"):
            stop._handle(signal.SIGINT, None)
    monkeypatch.delenv("LOCAL_RANK")
    with StopSignals() as stop:
        stop._handle(signal.SIGTERM, None)
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGTERM, None)
    with StopSignals() as stop:  # another process's signal, agreed on by the run loop
        stop.adopt(0)
        assert not stop.requested
        stop.adopt(int(signal.SIGTERM))
        assert stop.requested and stop.name == "SIGTERM"


def test_a_live_writers_temporary_folder_is_kept(tmp_path):
    live = tmp_path / f".tmp-checkpoint-4-{os.getppid()}-0123abcd"  # the parent process is running
    dead = tmp_path / ".tmp-checkpoint-4-999999999-0123abcd"
    live.mkdir()
    dead.mkdir()
    shards = tmp_path / ".tmp-sharded-8"  # a sharded save killed before its checkpoint existed (no pid in the name)
    (shards / "pytorch_model_fsdp_0").mkdir(parents=True)
    assert ckpt.clean_stale(tmp_path) == [dead.name, shards.name]
    assert live.is_dir() and not dead.exists() and not shards.exists()


def test_aligner_sft_stops_on_sigterm_with_a_checkpoint_and_resumes(tmp_path):
    """The Aligner's SFT runs on the same run loop (trainer/run_loop.py): the same signal handling and line."""
    out = tmp_path / "aligner"
    run = ["--max_steps", "1000", "--save_steps", "100000", "--logging_steps", "1000",
           "--per_device_train_batch_size", "4", "--data.train.limit", "64", "--data.eval", "null"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "alignfast.cli", "aligner", "train", "--config",
                             str(ROOT / "configs" / "aligner_toy.yaml"), "--trainer.output_dir", str(out), *run],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while _steps_done(out) < 1:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no step within 120 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    step = _steps_done(out)
    assert last == (f"alignfast aligner: stopped by SIGTERM after step {step} of 1000; checkpoint "
                    f"{out / f'checkpoint-{step}'} written; the same command with --resume continues the run"), last
    ckpt.verify(out / f"checkpoint-{step}")

    from alignfast.cli import main

    assert main(["aligner", "train", "--config", str(ROOT / "configs" / "aligner_toy.yaml"), "--trainer.output_dir",
                 str(out), *run[2:], "--max_steps", str(step + 1), "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, step + 2))


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_the_stop_line_is_printed_once_under_a_launcher(rank, printed, monkeypatch, capsys):
    """Every process stops after the same step and raised the same TrainingInterrupted: the main process says how
    to resume, the others only exit with the signal's code."""
    from alignfast.cli import cmd_train, main
    from alignfast.trainer.stop_signals import TrainingInterrupted

    def stopped(args, overrides):
        raise TrainingInterrupted(step=3, num_steps=9, checkpoint="out/checkpoint-3", signal_name="SIGTERM",
                                  exit_code=143)

    monkeypatch.setattr(cmd_train, "_train", stopped)
    monkeypatch.setenv("RANK", rank)
    assert main(["train", "--config", TOY]) == 143
    err = capsys.readouterr().err
    assert ("stopped by SIGTERM after step 3 of 9" in err) is printed, err


# A subprocess running the CLI with a patch that sends the signals from inside the run (signal.raise_signal: to the
# main thread, handled before it returns), so each test signals exactly where it means to, whatever the timing.
_DRIVER = """
import contextlib, signal, sys
from alignfast.trainer import base, checkpoint as ckpt
{patch}
from alignfast.cli import main
sys.exit(main(sys.argv[1:]))
"""
_IN_THE_FINAL_SAVE = """
real = ckpt.new_folder_atomically
@contextlib.contextmanager
def signalled(path, **kwargs):
    with real(path, **kwargs) as tmp:
        yield tmp  # write(tmp): the model's files are written here
        if path.name == "final":  # then the signals, before the folder is put in its place
            for _ in range({times}):
                signal.raise_signal(signal.SIGTERM)
ckpt.new_folder_atomically = signalled
"""
_TWICE_IN_STEP_4 = """
real = base.PPOEngineTrainer._train_step
def step(self, step, last_good):
    if step == 3:  # the 4th step: checkpoint-2 written, step 4 not
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
    return real(self, step, last_good)
base.PPOEngineTrainer._train_step = step
"""
# 10 short steps (each test gives its save_strategy or save_steps)
SHORT = ["--total_episodes", "40", "--per_device_train_batch_size", "4", "--num_mini_batches", "1",
         "--num_ppo_epochs", "1", "--response_length", "6", "--logging_steps", "1000", "--data.eval", "null"]


def _run_patched(tmp_path, patch: str, args: list[str]) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK")}  # one process: no launcher rule
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _DRIVER.format(patch=patch), "train", "--config", TOY, *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def _last_line(err: str) -> str:
    return [line for line in err.splitlines() if line.strip()][-1]


def _assert_loadable(final: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final) is not None


def test_sigterm_during_the_final_save_lets_it_complete(tmp_path):
    """The review's case: SIGTERM while final/ was written killed the process (rc 143, no line), and with
    save_strategy 'no' the trained run was lost. Now the save completes, a warning says so, and then the signal
    takes effect (the default handler here: the process ends by SIGTERM; `alignfast demo` would not go on to its
    next arm)."""
    out = tmp_path / "run"
    code, err = _run_patched(tmp_path, _IN_THE_FINAL_SAVE.format(times=1),
                             ["--trainer.output_dir", str(out), "--save_strategy", "no", *SHORT])
    assert code == -signal.SIGTERM, (code, err[-3000:])
    final = out / "final"
    assert f"SIGTERM received: finishing the save of {final} first (send it again to stop at once; the folder then " \
           "stays as it was)" in err, err[-3000:]
    assert f"SIGTERM was received during the save of {final}: the save completed first; SIGTERM takes effect now" \
        in err
    _assert_loadable(final)
    assert not list(out.glob(".tmp-checkpoint-*")) and not list(out.glob("checkpoint-*"))


def test_a_second_signal_during_the_final_save_leaves_the_folder_as_it_was_and_says_how_to_rewrite_it(tmp_path):
    out = tmp_path / "run"
    code, err = _run_patched(tmp_path, _IN_THE_FINAL_SAVE.format(times=2),
                             ["--trainer.output_dir", str(out), "--save_steps", "4", *SHORT])
    assert code == 128 + signal.SIGTERM, err[-3000:]
    final = out / "final"
    assert _last_line(err) == (
        f"alignfast train: stopped at once by SIGTERM received twice, during the save of {final} after step 10 of 10: "
        f"{final} was not written; the same command with --resume continues from {out / 'checkpoint-10'} and "
        "writes it again"), err[-3000:]
    assert not final.exists() and not list(out.glob(".tmp-checkpoint-*"))
    ckpt.verify(out / "checkpoint-10")

    from alignfast.cli import main  # what the line says: --resume loads checkpoint-10 and writes final/

    assert main(["train", "--config", TOY, "--trainer.output_dir", str(out), "--save_steps", "4", *SHORT,
                 "--resume"]) == 0
    _assert_loadable(final)


def test_a_second_sigterm_during_training_exits_143_naming_the_last_checkpoint(tmp_path):
    """The second signal used to end in 'alignfast train: interrupted' and exit code 130, whichever the signal."""
    out = tmp_path / "run"
    code, err = _run_patched(tmp_path, _TWICE_IN_STEP_4, ["--trainer.output_dir", str(out), "--save_steps", "2",
                                                          *SHORT])
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM received: finishing the current step, then writing a checkpoint and stopping (send it again to " \
           "stop at once without a checkpoint)" in err, err[-3000:]
    assert _last_line(err) == (
        f"alignfast train: stopped at once by SIGTERM received twice, after step 3 of 10; the last checkpoint is "
        f"{out / 'checkpoint-2'}: the same command with --resume continues the run from it"), err[-3000:]
    ckpt.verify(out / "checkpoint-2")
    assert not (out / "checkpoint-4").exists() and not list(out.glob(".tmp-checkpoint-*"))


def test_the_second_signal_lines_and_exceptions():
    """StoppedAtOnce: a KeyboardInterrupt and a TrainingInterrupted (so `except TrainingInterrupted` still finds the
    checkpoint to resume from) with the second signal's exit code; its lines without a checkpoint, and with an
    earlier model kept."""
    from alignfast.trainer.stop_signals import StoppedAtOnce, StopSignals, TrainingInterrupted, stopped_at_once

    err = stopped_at_once(signal.SIGINT, 3, 9, None, how="x")
    assert isinstance(err, TrainingInterrupted) and isinstance(err, KeyboardInterrupt)
    assert err.exit_code == 130 and err.signal_name == "SIGINT" and err.checkpoint is None
    assert err.line("--resume") == ("stopped at once by SIGINT received twice, after step 3 of 9; no checkpoint was "
                                    "written: the run cannot be resumed")
    kept = stopped_at_once(signal.SIGTERM, 9, 9, "out/checkpoint-9", how="x", folder="out/final", folder_kept=True)
    assert kept.exit_code == 143 and kept.line("--resume") == (
        "stopped at once by SIGTERM received twice, during the save of out/final after step 9 of 9: out/final keeps "
        "the earlier model; --resume continues from out/checkpoint-9 and writes it again")
    assert stopped_at_once(signal.SIGTERM, 9, 9, None, how="x", folder="out/final").line("--resume").endswith(
        ": out/final was not written; no checkpoint was written, so the run cannot be resumed: this model is lost")

    at_once = lambda signum: stopped_at_once(signum, 2, 5, "c", how="x")  # noqa: E731
    with StopSignals(at_once=at_once) as outer:
        with StopSignals() as inner:  # a save inside a training step: the training's handling stays
            assert not inner._previous
            outer._handle(signal.SIGTERM, None)
            with pytest.raises(StoppedAtOnce, match="SIGTERM received twice, after step 2 of 5") as raised:
                outer._handle(signal.SIGTERM, None)
    assert raised.value.exit_code == 143 and not inner.requested
