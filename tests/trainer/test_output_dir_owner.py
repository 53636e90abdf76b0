"""One run per output_dir: a run in use is locked, a resume from another run's checkpoint does not overwrite the
run a folder holds, and a run killed before its first checkpoint says there is nothing to resume."""

import json
import subprocess
import sys
import textwrap

import pytest

from alignfast.ops._checks import AlignfastArgumentError
from alignfast.trainer import checkpoint as ckpt
from alignfast.trainer.output_lock import LOCK_FILE, lock_output_dir, release_command_locks
from tests.trainer.test_resume import make
from tests.trainer.tiny import small_world


def _holder(out):
    """A second process holding output_dir's lock (as a live run does) until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from alignfast.trainer.output_lock import lock_output_dir
        lock = lock_output_dir({str(out)!r})
        print("held", flush=True)
        sys.stdin.read()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_into_an_output_dir_in_use_is_refused_and_touches_nothing(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        trainer, _ = make(tok, prompter_dir, out, max_steps=2, save_steps=1, overwrite_output_dir=True)
        with pytest.raises(AlignfastArgumentError, match=r"'output_dir' '.*run' is in use by another run \(process "
                                                         rf"{holder.pid}\)"):
            trainer.train()
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        holder.stdin.close()
        holder.wait()
    trainer.train()  # the lock went with its process
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    # Its own process may go on (a second train() call, the final save, a resume in the same process).
    resumed, _ = make(tok, prompter_dir, out, max_steps=3, save_steps=1)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.global_step == 3
    del trainer, resumed
    release_command_locks()


def test_the_lock_is_reentrant_in_one_process_and_released_with_its_holder(tmp_path):
    a = lock_output_dir(tmp_path / "x")
    assert lock_output_dir(tmp_path / "x") is a
    release_command_locks()
    assert a.fd is None
    b = lock_output_dir(tmp_path / "x")
    assert b is not a and b.fd is not None
    del b  # garbage: the flock goes with it
    holder = _holder(tmp_path / "x")
    holder.stdin.close()
    holder.wait()


def test_resuming_another_runs_checkpoint_into_a_folder_holding_a_run_is_refused(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    make(tok, prompter_dir, a, max_steps=2, save_steps=1)[0].train()
    make(tok, prompter_dir, b, max_steps=3, save_steps=1, seed=5)[0].train()
    before = (b / "metrics.jsonl").read_text()
    resumed, _ = make(tok, prompter_dir, b, max_steps=3, save_steps=1)
    with pytest.raises(AlignfastArgumentError, match=r"'output_dir' '.*b' holds another run \(checkpoint-1, "
                                                     r"checkpoint-2, checkpoint-3, \.\.\.\) and .*a/checkpoint-2 "
                                                     r"is not one of its.*overwrite_output_dir"):
        resumed.train(resume_from_checkpoint=str(a / "checkpoint-2"))
    assert (b / "metrics.jsonl").read_text() == before
    assert [p.name for p in ckpt.list_checkpoints(b)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    # With overwrite_output_dir the old run goes first: no checkpoint of it is left for a later --resume.
    resumed, _ = make(tok, prompter_dir, b, max_steps=3, save_steps=1, overwrite_output_dir=True)
    resumed.train(resume_from_checkpoint=str(a / "checkpoint-2"))
    assert [p.name for p in ckpt.list_checkpoints(b)] == ["checkpoint-3"]
    assert [json.loads(x)["step"] for x in (b / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # Into an empty folder, or from output_dir's own checkpoint, a resume needs nothing.
    make(tok, prompter_dir, tmp_path / "c", max_steps=3)[0].train(resume_from_checkpoint=str(a / "checkpoint-2"))
    make(tok, prompter_dir, b, max_steps=3)[0].train(resume_from_checkpoint=str(b / "checkpoint-3"))


def test_a_run_killed_before_its_first_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    trainer, _ = make(tok, prompter_dir, out, max_steps=1)
    with pytest.raises(AlignfastArgumentError, match=r"a run with no checkpoint \(metrics.jsonl\), so "
                                                     r"there is nothing to resume: replace it with "
                                                     r"overwrite_output_dir \(--trainer.overwrite_output_dir true\)"):
        trainer.train()


def test_the_command_refuses_an_output_dir_in_use_before_loading_a_model(tmp_path, capsys, monkeypatch):
    from alignfast.cli import build, main
    from tests.hardening.test_cli_one_line import SMALL, TOY, one_line

    loaded = []
    monkeypatch.setattr(build, "load_data", lambda *a, **k: loaded.append(1))
    holder = _holder(tmp_path / "run")
    try:
        line = one_line(capsys, main(["train", "--config", TOY, "--trainer.output_dir", str(tmp_path / "run"),
                                      *SMALL]))
    finally:
        holder.stdin.close()
        holder.wait()
    assert "'output_dir'" in line and "is in use by another run" in line and not loaded
