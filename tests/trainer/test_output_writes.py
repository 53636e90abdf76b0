"""Writing a run's files: weights readable as the umask says, and a full disk or a read-only output_dir in one
line naming output_dir (and the last good checkpoint), not torch's "[enforce fail at inline_container.cc]"."""

import errno
import os
import stat

import pytest
import torch

from alignfast.trainer.checkpoint import OutputWriteError
from tests.trainer.test_resume import make
from tests.trainer.tiny import small_world


def test_model_weights_are_saved_under_the_umask(tmp_path):
    from alignfast.trainer.proxy_model import ProxyModel

    tok, prompter_dir = small_world(tmp_path)
    old = os.umask(0o022)
    try:
        trainer, _ = make(tok, prompter_dir, tmp_path / "run", max_steps=1, save_steps=1)
        trainer.train()
        trainer.save_model(tmp_path / "run" / "final")
        ProxyModel(8, 8, 4).save_pretrained(tmp_path / "proxy")
    finally:
        os.umask(old)
    files = [*(tmp_path / "run").rglob("*.safetensors"), *(tmp_path / "proxy").rglob("*.safetensors")]
    assert {f.relative_to(tmp_path).as_posix() for f in files} >= {"run/checkpoint-1/policy/model.safetensors",
                                                                   "run/final/model.safetensors",
                                                                   "proxy/proxy.safetensors"}
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {oct(0o644)}


@pytest.mark.parametrize("failure", [RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 "
                                                  "vs 0"), OSError(errno.ENOSPC, "No space left on device")])
def test_a_full_disk_at_a_checkpoint_is_one_line_naming_the_last_good_one(tmp_path, monkeypatch, failure):
    tok, prompter_dir = small_world(tmp_path)
    out = tmp_path / "run"
    trainer, _ = make(tok, prompter_dir, out, max_steps=3, save_steps=1)
    real, calls = torch.save, []

    def full_after_one_checkpoint(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 4:  # checkpoint-1's four files went through
            raise failure
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_after_one_checkpoint)
    with pytest.raises(OutputWriteError) as info:
        trainer.train()
    line = str(info.value)
    assert "\n" not in line and f"'output_dir' '{out}': cannot write checkpoint-2 there" in line
    assert f"the last good checkpoint is {out / 'checkpoint-1'}" in line
    assert not list(out.glob(".tmp-checkpoint-*"))


def test_an_output_dir_that_cannot_be_written_fails_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from alignfast.cli import build, main
    from tests.hardening.test_cli_one_line import SMALL, TOY, one_line

    loaded = []
    monkeypatch.setattr(build, "load_data", lambda *a, **k: loaded.append(1))
    (tmp_path / "file").write_text("")
    line = one_line(capsys, main(["train", "--config", TOY, "--trainer.output_dir", str(tmp_path / "file" / "run"),
                                  *SMALL]))
    assert f"'output_dir' '{tmp_path / 'file' / 'run'}' cannot be written ({tmp_path / 'file'} is a file, not a " \
           "folder)" in line and not loaded
