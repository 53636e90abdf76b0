"""save_model's folder (final/) is replaced atomically: an existing one holds exactly the new model afterwards, a
failure or a kill mid-write leaves the earlier one as it was, and what a killed writer left is put back or removed.
For every trainer's save_model: Align-Pro's (the PPO base: Oracle and Proxy-RLHF too), the Aligner's,
Proxy-RLHF's."""

import logging
import subprocess
import sys

import pytest
import torch

from alignfast.ops import AlignfastArgumentError
from alignfast.trainer import checkpoint as ckpt
from tests.trainer.tiny import echo_trainer, small_world


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    """The pid of a process that has ended (a killed writer's)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _bump(model):
    with torch.no_grad():
        next(model.parameters()).add_(1.0)


@pytest.fixture
def align_pro(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    trainer, _ = echo_trainer(tok, prompter_dir, output_dir=str(tmp_path / "run"), rewrite_template="{prompt}",
                              response_length=4, per_device_train_batch_size=3, save_strategy="no")
    return trainer


def _aligner(tmp_path):
    from alignfast.aligner import AlignerConfig, AlignerTrainer
    from tests.aligner.helpers import ROWS, TEMPLATE, tiny_corrector

    model, tok = tiny_corrector(tmp_path)
    return AlignerTrainer(AlignerConfig(output_dir=str(tmp_path / "run"), template=TEMPLATE, max_steps=1,
                                        save_strategy="no"), model, tok, train_dataset=ROWS)


def _proxy(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignfast.toy import load_world
    from alignfast.trainer.proxy_rlhf import ProxyRLHFConfig, ProxyRLHFTrainer

    world = load_world()
    tok = AutoTokenizer.from_pretrained(world.target_path)
    cfg = ProxyRLHFConfig(output_dir=str(tmp_path / "run"), save_strategy="no", per_device_train_batch_size=8,
                          max_steps=1, target_max_new_tokens=4, proxy_hidden_size=16, report_to="none")
    return ProxyRLHFTrainer(cfg, AutoModelForCausalLM.from_pretrained(world.target_path), tok,
                            reward_funcs=world.reward_funcs, train_dataset=world.train_prompts[:8])


@pytest.mark.parametrize("make", ["align_pro", "aligner", "proxy"])
def test_an_existing_final_folder_is_replaced_by_exactly_the_new_model(make, tmp_path, request):
    trainer = request.getfixturevalue("align_pro") if make == "align_pro" else \
        {"aligner": _aligner, "proxy": _proxy}[make](tmp_path)
    final = tmp_path / "run" / "final"
    assert trainer.save_model() == final  # the default: output_dir/final, as the CLI saves it
    before = _files(final)
    _bump(trainer.model)
    trainer.save_model(final)
    fresh = trainer.save_model(tmp_path / "fresh")
    assert _files(final) == _files(fresh) != before
    assert not [p.name for p in final.parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("make", ["align_pro", "aligner"])
def test_a_failure_mid_write_leaves_the_earlier_final_folder_intact(make, tmp_path, request, monkeypatch):
    trainer = request.getfixturevalue("align_pro") if make == "align_pro" else _aligner(tmp_path)
    final = trainer.save_model(tmp_path / "run" / "final")
    before = _files(final)
    _bump(trainer.model)

    def full_disk(*args, **kwargs):  # after the weights went out: a half-written folder
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.tokenizer, "save_pretrained", full_disk)
    with pytest.raises(ckpt.OutputWriteError, match="No space left on device"):
        trainer.save_model(final)
    assert _files(final) == before
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]


def test_what_a_killed_save_left_is_removed_or_put_back(align_pro, tmp_path):
    run = tmp_path / "run"
    final = align_pro.save_model(run / "final")
    pid = _dead_pid()
    half = run / f".tmp-checkpoint-final-{pid}-0123abcd"  # killed while writing the new copy
    (half / "sub").mkdir(parents=True)
    (half / "sub" / "model.safetensors").write_bytes(b"half")
    align_pro.save_model(final)
    assert sorted(p.name for p in run.iterdir()) == ["final"]

    # Killed between the two renames: final/ is inside the replaced-folder temp; the next save puts it back first,
    # clean_stale (a run's start) too.
    before = _files(final)
    for clean in (lambda: align_pro.save_model(final), lambda: ckpt.clean_stale(run)):
        caught = run / f".tmp-checkpoint-replaced-folder-final-{pid}-0123abcd"
        caught.mkdir()
        final.rename(caught / "c")
        clean()
        assert sorted(p.name for p in run.iterdir()) == ["final"] and _files(final) == before


def test_files_only_the_earlier_final_folder_had_are_kept_aside_with_a_warning(align_pro, tmp_path, caplog):
    final = align_pro.save_model(tmp_path / "run" / "final")
    (final / "notes.txt").write_text("mine")
    (final / "adapter_model.safetensors").write_bytes(b"an earlier LoRA adapter")
    with caplog.at_level(logging.WARNING, logger="alignfast.trainer"):
        align_pro.save_model(final)
    aside = [p for p in final.parent.iterdir() if p.name.startswith("final.replaced-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine"
    assert not (final / "notes.txt").exists() and not (final / "adapter_model.safetensors").exists()
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"{final} held adapter_model.safetensors, notes.txt, which the model saved there now does not write: "
               f"the earlier folder is kept whole as {aside[0]}" in m for m in lines), lines


def test_a_run_folder_is_refused_as_the_model_folder(align_pro, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(AlignfastArgumentError, match=r"^alignfast: argument 'output_dir' of save_model, '.*run', "
                                                     r"holds a training run \(metrics.jsonl\)"):
        align_pro.save_model(run)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_a_folder_containing_the_run_or_no_model_is_refused(align_pro, tmp_path, monkeypatch):
    """A parent of the run's output_dir (it would move the live run aside), the working folder, and an existing folder
    of other files (they would be moved aside, not replaced) are refused in one line naming output_dir; nothing
    moves."""
    (tmp_path / "run").mkdir(exist_ok=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(AlignfastArgumentError, match=r"^alignfast: argument 'output_dir' of save_model, '.*', holds a "
                                                     r"training run \(the run's output_dir .*run\)"):
        align_pro.save_model(tmp_path)
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(AlignfastArgumentError, match=r"'\.', is the working or home folder"):
        align_pro.save_model(".")
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "other.bin").write_bytes(b"x")
    with pytest.raises(AlignfastArgumentError, match=r"'.*models', holds files that are not a saved model \(other.bin\)"):
        align_pro.save_model(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["models"])
    assert [p.name for p in mine.iterdir()] == ["other.bin"]


def test_a_failed_swap_puts_the_earlier_folder_back(align_pro, tmp_path, monkeypatch):
    """The second rename of a replacement that keeps the earlier folder aside fails (a full disk, say): the earlier
    folder returns to final/, and no temporary copy stays."""
    import os

    final = align_pro.save_model(tmp_path / "run" / "final")
    (final / "notes.txt").write_text("mine")
    before = _files(final)
    real_replace = os.replace

    def replace(src, dst):
        if str(src).startswith(str(final.parent / ckpt.TMP_PREFIX)) and str(dst) == str(final):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(Exception, match="No space left"):
        align_pro.save_model(final)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert _files(final) == before
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]


def test_the_cli_refuses_a_final_folder_it_could_not_replace_before_training(tmp_path, capsys):
    """`alignfast train` saves to output_dir/final at the end: a final/ of someone else's files is refused up front,
    in one line, before any model loads or step runs (it was refused only after training)."""
    from pathlib import Path

    from alignfast.cli import main

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "notes.txt").write_text("mine")
    toy = str(Path(__file__).resolve().parents[2] / "configs" / "toy.yaml")
    assert main(["train", "--config", toy, "--trainer.output_dir", str(run), "--trainer.total_episodes", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has a final/ holding files that are not a saved model (notes.txt)" in err[0], err
    assert "move or delete it, or choose another output_dir" in err[0]
    assert sorted(p.name for p in run.iterdir()) == [".alignfast.lock", "final"]  # no metrics, no checkpoint
    # overwrite_output_dir removes an earlier run's final/, but this folder holds no run: it is still refused
    assert main(["train", "--config", toy, "--trainer.output_dir", str(run), "--trainer.total_episodes", "64",
                 "--trainer.overwrite_output_dir", "true"]) == 2
    assert "has a final/ holding files" in capsys.readouterr().err


def test_a_symlinked_final_folder_is_not_judged_by_what_it_points_to(align_pro, tmp_path):
    """The swap moves a symlink, not the folder it points to: a final/ that links to a folder of other files is
    replaced (the link kept aside), and the folder it pointed to is untouched."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "final").symlink_to(mine, target_is_directory=True)
    final = align_pro.save_model(tmp_path / "run" / "final")
    assert not final.is_symlink() and (final / "config.json").is_file()
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
