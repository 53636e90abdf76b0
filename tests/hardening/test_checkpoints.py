"""Checkpoints that can be trusted (issue 10 cases 8, 9, 11, 13; issue 14 item 1): verified against a manifest
before a resume, a fallback past damaged ones that names them, no stale temporary folders, folders other users
can read, one copy of the weights (a test fails if a checkpoint holds a tensor twice, or grows past 1.1x the
trainable state), and a resume with another model or value head is one line naming the checkpoint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignfast.ops._checks import AlignfastArgumentError
from alignfast.trainer import AlignProConfig, AlignProTrainer
from alignfast.trainer import checkpoint as ckpt
from alignfast.trainer.resume_checks import CheckpointMismatchError
from tests.trainer.tiny import TRAIN_PROMPTS, FunctionTarget, keyword_reward, make_causal_lm, small_world


def trainer_for(tok, prompter, out, *, value_head="separate", **cfg):
    config = AlignProConfig(output_dir=str(out), per_device_train_batch_size=3, response_length=3, save_steps=1,
                            rewrite_template="{prompt}", value_head=value_head, **{"max_steps": 2, **cfg})
    model = prompter if isinstance(prompter, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(prompter)
    return AlignProTrainer(config, model, tok, FunctionTarget(lambda s: s, tok), reward_funcs=[keyword_reward],
                           train_dataset=TRAIN_PROMPTS)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-step run with checkpoint-1 and checkpoint-2 (copied per test where it is damaged)."""
    root = tmp_path_factory.mktemp("ckrun")
    tok, prompter = small_world(root)
    trainer = trainer_for(tok, prompter, root / "out")
    trainer.train()
    return tok, prompter, root / "out", trainer


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _damage(bad, how):
    if how == "truncated":
        data = (bad / "trainable.pt").read_bytes()
        (bad / "trainable.pt").write_bytes(data[: len(data) // 2])
    elif how == "empty":  # what a power loss without fsync leaves
        (bad / "trainable.pt").write_bytes(b"")
    elif how == "garbage-state":
        (bad / ckpt.STATE_FILE).write_text("{not json")
    elif how == "truncated-model":
        data = (bad / "policy" / "model.safetensors").read_bytes()
        (bad / "policy" / "model.safetensors").write_bytes(data[:100])
    else:
        (bad / "policy" / "model.safetensors").unlink()


DAMAGES = ["truncated", "empty", "garbage-state", "missing-file"]


def test_a_checkpoint_without_manifest_is_resumed_unverified_and_a_final_folder_is_named(run, tmp_path):
    _, _, out, trainer = run
    copy = _copy_run(out, tmp_path / "legacy")
    (copy / "checkpoint-2" / ckpt.MANIFEST).unlink()  # as an alignfast without manifests wrote it
    warnings = []
    assert ckpt.resume_point(copy, True, warn=warnings.append) == copy / "checkpoint-2"
    assert len(warnings) == 1 and "no manifest.json" in warnings[0] and "unverified" in warnings[0]
    (copy / "checkpoint-2" / ckpt.STATE_FILE).write_text("")  # and without a readable state: damaged, skipped
    assert ckpt.resume_point(copy, True, warn=warnings.append) == copy / "checkpoint-1"
    final = trainer.save_model(tmp_path / "final")
    with pytest.raises(FileNotFoundError, match=r"final is not a checkpoint \(no trainer_state.json\)"):
        ckpt.resume_point(copy, final)


def test_eval_names_a_damaged_checkpoint(run, tmp_path):
    from alignfast.cli.checkpoints import policy_dir
    from alignfast.cli.errors import CLIError

    _, _, out, _ = run
    copy = _copy_run(out, tmp_path / "out")
    assert policy_dir(copy / "checkpoint-2") == copy / "checkpoint-2" / "policy"
    _damage(copy / "checkpoint-2", "truncated-model")
    for path in (copy / "checkpoint-2", copy / "checkpoint-2" / "policy"):
        with pytest.raises(CLIError, match=r"checkpoint-2 is damaged or incomplete: policy/model.safetensors has"):
            policy_dir(path)


def test_eval_refuses_the_temporary_folder_of_a_killed_save(run, tmp_path):
    """kill -9 after a checkpoint's policy/ was written leaves .tmp-checkpoint-<step>-<pid>-<hex>/policy, which
    holds a loadable model and nothing else: `alignfast eval --checkpoint` / `--proxy-checkpoint` evaluated it
    without a word. It is refused, as --resume refuses it, whether the folder or its policy/ is passed."""
    import shutil

    from alignfast.cli.checkpoints import policy_dir
    from alignfast.cli.errors import CLIError
    from alignfast.cli.eval_proxy import proxy_dir

    _, _, out, _ = run
    left = tmp_path / f"{ckpt.TMP_PREFIX}2-999999999-0123abcd"
    shutil.copytree(out / "checkpoint-2" / "policy", left / "policy")
    for resolve in (policy_dir, proxy_dir):
        for path in (left, left / "policy"):
            with pytest.raises(CLIError, match=r"is a temporary folder that a save left unfinished"):
                resolve(path)


def test_damaged_checkpoints_are_detected_and_skipped_by_name(run, tmp_path):
    _, _, out, _ = run
    for how in DAMAGES:
        copy = _copy_run(out, tmp_path / how)
        _damage(copy / "checkpoint-2", how)
        with pytest.raises(ckpt.CorruptCheckpointError, match="checkpoint-2 is damaged or incomplete"):
            ckpt.verify(copy / "checkpoint-2")
        warnings = []
        assert ckpt.resume_point(copy, True, warn=warnings.append) == copy / "checkpoint-1"
        assert len(warnings) == 1 and "not resuming from checkpoint-2" in warnings[0], (how, warnings)
        with pytest.raises(ckpt.CorruptCheckpointError, match="checkpoint-2 is damaged"):  # named explicitly: no guess
            ckpt.resume_point(copy, copy / "checkpoint-2")
        _damage(copy / "checkpoint-1", "empty")
        with pytest.raises(ckpt.CorruptCheckpointError, match="no checkpoint in it passes verification"):
            ckpt.resume_point(copy, True)


def test_a_damaged_latest_checkpoint_falls_back_with_a_warning(run, tmp_path, caplog):
    tok, prompter, out, _ = run
    out = _copy_run(out, tmp_path / "out")
    bad = out / "checkpoint-2"
    _damage(bad, "empty")
    with pytest.raises(ckpt.CorruptCheckpointError, match="checkpoint-2 is damaged"):  # named explicitly: an error
        trainer_for(tok, prompter, out, max_steps=3).train(resume_from_checkpoint=str(bad))
    trainer = trainer_for(tok, prompter, out, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="alignfast.trainer"):
        trainer.train(resume_from_checkpoint=True)
    warned = [r.getMessage() for r in caplog.records if "not resuming from checkpoint-2" in r.getMessage()]
    assert len(warned) == 1 and "resuming from checkpoint-1 instead" in warned[0], caplog.text
    assert trainer.global_step == 3 and len(trainer.history) == 3  # continued from step 1, not 2
    ckpt.verify(bad)  # step 2 was trained again and its checkpoint rewritten whole


def test_a_resumed_run_matches_after_falling_back(run, tmp_path):
    """The fallback resumes exactly: checkpoint-1 plus one step gives checkpoint-2's parameters again."""
    tok, prompter, out, trainer = run
    out = _copy_run(out, tmp_path / "out")
    (out / "checkpoint-2" / "trainable.pt").write_bytes(b"")
    again = trainer_for(tok, prompter, out / ".." / "out2", max_steps=2)
    again.config.output_dir = str(out)
    again.train(resume_from_checkpoint=True)
    for (n, p), (_, q) in zip(trainer.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q), n


def test_stale_temporary_folders_are_removed_and_folders_are_readable(run, tmp_path, caplog):
    tok, prompter, out, _ = run
    out = _copy_run(out, tmp_path / "out")
    stale = out / ".tmp-checkpoint-3-999999999-0123abcd"  # a pid that cannot be running
    (stale / "policy").mkdir(parents=True)
    (stale / "trainable.pt").write_bytes(b"x" * 1000)
    legacy = out / ".tmp-checkpoint-3-k2j4h5"  # tempfile.mkdtemp's name, from an older alignfast
    legacy.mkdir()
    # killed between the two renames of a rewrite of checkpoint-2: the old copy is put back
    replaced = out / ".tmp-checkpoint-replaced-2-999999999-0123abcd"
    replaced.mkdir()
    os.replace(out / "checkpoint-2", replaced / "c")
    old_umask = os.umask(0o022)
    try:
        with caplog.at_level(logging.WARNING, logger="alignfast.trainer"):
            trainer_for(tok, prompter, out, max_steps=3).train(resume_from_checkpoint=True)
    finally:
        os.umask(old_umask)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".alignfast.lock"]
    assert "removed" in caplog.text and stale.name in caplog.text
    ckpt.verify(out / "checkpoint-2")
    for name in ("checkpoint-2", "checkpoint-3"):  # 3 written now, under umask 022: readable by others
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode & 0o055 == 0o055, (name, oct(mode))
    assert json.loads((out / "checkpoint-3" / ckpt.STATE_FILE).read_text())["global_step"] == 3


def _tensors(path) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a checkpoint holds, in any file."""
    from safetensors.torch import load_file

    found = []

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            found.append((prefix, obj))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}[{i}]", v)

    for f in sorted(path.rglob("*")):
        if f.suffix == ".pt":
            walk(f.name, torch.load(f, weights_only=False))
        elif f.suffix == ".safetensors":
            walk(f.relative_to(path).as_posix(), load_file(str(f)))
    return found


def assert_no_tensor_twice(path):
    seen: dict[str, str] = {}
    for name, t in _tensors(path):
        if t.numel() < 16 or bool((t == t.reshape(-1)[0]).all()):  # constants (a zero-initialised LoRA B) may repeat
            continue
        key = hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        assert key not in seen, f"{path.name} holds the same tensor twice: {seen[key]} and {name}"
        seen[key] = name


def test_checkpoints_hold_each_tensor_once_within_1_1x_the_trainable_state(tmp_path):
    """The default separate critic (a full second backbone): policy/ + critic + optimizer, nothing twice.
    (The shared value head and LoRA are covered by the PEFT test below.)"""
    from alignfast.trainer.checkpoint import POLICY_FILES
    from tests.trainer.tiny import make_tokenizer

    tok = make_tokenizer(tmp_path / "tok", [f"w{i}" for i in range(250)])
    prompter = make_causal_lm(tmp_path / "p", len(tok), hidden=64, layers=2)
    trainer = trainer_for(tok, prompter, tmp_path / "out", max_steps=1)
    trainer.train()
    path = tmp_path / "out" / "checkpoint-1"
    assert_no_tensor_twice(path)
    saved = torch.load(path / "trainable.pt", weights_only=True)
    assert saved["policy"] == {} and len(saved[POLICY_FILES]) == len(list(trainer.model.parameters()))
    params = sum(p.numel() * p.element_size() for p in trainer.params)
    optim = sum(v.numel() * v.element_size() for s in trainer.optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    metadata = 96 * 1024  # tokenizer, configs, RNG states, trainer_state.json, manifest: independent of the model
    assert size <= 1.1 * (params + optim) + metadata, (size, params, optim)
    ckpt.verify(path)


def test_the_duplicate_detector_catches_a_second_copy(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(4))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    w = torch.randn(64)

    def save_policy(d):
        from safetensors.torch import save_file

        d.mkdir()
        save_file({"other": torch.randn(64)}, str(d / "model.safetensors"))

    path = ckpt.save_checkpoint(tmp_path, 1, trainable={"policy": {"w": w}, "value_model": {"v": w.clone()}},
                                optimizer=opt, scheduler=sched, trainer_state={}, save_policy=save_policy)
    with pytest.raises(AssertionError, match="holds the same tensor twice"):
        assert_no_tensor_twice(path)
    # and a parameter save_pretrained did not store (bit for bit) stays in trainable.pt, so resume still has it
    assert torch.equal(ckpt.load_checkpoint(path)["trainable"]["policy"]["w"], w)


def test_peft_checkpoint_keeps_the_adapter_once_and_resumes(tmp_path):
    peft = pytest.importorskip("peft")
    tok, prompter = small_world(tmp_path)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    config = AlignProConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, response_length=3,
                            save_steps=1, rewrite_template="{prompt}", max_steps=2, value_head="shared",
                            learning_rate=1e-2)
    make = lambda: AlignProTrainer(config, AutoModelForCausalLM.from_pretrained(prompter), tok,  # noqa: E731
                                   FunctionTarget(lambda s: s, tok), reward_funcs=[keyword_reward],
                                   train_dataset=TRAIN_PROMPTS, peft_config=lora)
    first = make()
    with warnings.catch_warnings(record=True) as caught:  # PeftModel.forward takes **kwargs: the cache keyword is
        warnings.simplefilter("always")                   # read from the base model (issue 10 case 17, with LoRA)
        first.train()
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    path = tmp_path / "out" / "checkpoint-2"
    assert_no_tensor_twice(path)
    saved = torch.load(path / "trainable.pt", weights_only=True)
    assert saved["policy"] == {} and all("lora_" in n for n in saved[ckpt.POLICY_FILES])
    assert not any(f.name == "model.safetensors" for f in path.rglob("*"))  # no frozen base weights anywhere
    second = make()
    second._load_checkpoint(path)
    for (n, p), (_, q) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), n


def test_resuming_with_another_value_head_or_model_is_one_line(run, tmp_path):
    tok, prompter, out, _ = run
    with pytest.raises(CheckpointMismatchError, match=r"cannot resume from .*checkpoint-2: it was written with "
                                                      r"value_head='separate' and this run has value_head='shared'"):
        trainer_for(tok, prompter, out, value_head="shared", max_steps=3).train(resume_from_checkpoint=True)
    other = make_causal_lm(tmp_path / "other", len(tok), hidden=32, layers=1)
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint-2: prompter parameter '.*' has shape .* there"):
        trainer_for(tok, other, out, max_steps=3).train(resume_from_checkpoint=True)
    assert issubclass(CheckpointMismatchError, AlignfastArgumentError)  # the CLI prints these in one line


def test_resuming_from_another_model_of_the_same_shape_is_one_line(run, tmp_path):
    tok, _, out, _ = run
    same_shape_other_weights = make_causal_lm(tmp_path / "other", len(tok), seed=5, hidden=16, layers=1)
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint-2: it was trained from other frozen weights: its "
                                                      r"reference \(SFT\) weights differ"):
        trainer_for(tok, same_shape_other_weights, out, max_steps=3).train(resume_from_checkpoint=True)


def test_the_final_model_appears_whole_or_not_at_all(run, tmp_path, monkeypatch):
    *_, trainer = run

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(trainer.tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_model(tmp_path / "final")
    assert list(tmp_path.iterdir()) == []  # neither final/ nor a temporary folder is left
    monkeypatch.undo()
    assert (trainer.save_model(tmp_path / "final") / "config.json").is_file()


def test_a_checkpoint_of_another_arm_is_refused():
    from alignfast.trainer.resume_checks import check_same_reference

    check_same_reference("c", {"arm": "align-pro", "reference_fingerprint": "ab"}, "ab", "align-pro")
    with pytest.raises(CheckpointMismatchError, match=r"written by the 'oracle' arm and this is the 'align-pro' arm"):
        check_same_reference("c", {"arm": "oracle"}, "ab", "align-pro")


def test_a_sharded_checkpoint_under_a_launch_that_does_not_shard_says_so(tmp_path):
    """Same process count, no sharding (an fsdp2.yaml run resumed with ddp.yaml): the message used to be "2
    process(es) cannot resume ...: sharded over 2 processes; resume with ... --num_processes 2"."""
    from types import SimpleNamespace

    from alignfast.ops._checks import AlignfastArgumentError
    from alignfast.trainer.distributed import SHARDS, check_resumable

    (tmp_path / SHARDS).mkdir()
    ddp = SimpleNamespace(num_processes=2, sharded_state=False)
    with pytest.raises(AlignfastArgumentError, match="sharded over 2 processes .*this launch does not shard"):
        check_resumable(ddp, tmp_path, {"num_processes": 2})
    assert check_resumable(SimpleNamespace(num_processes=2, sharded_state=True), tmp_path,
                           {"num_processes": 2}) == tmp_path / SHARDS


def test_a_failed_rewrite_of_a_step_puts_its_checkpoint_back(tmp_path, monkeypatch):
    """A step written again (a rerun) replaces its checkpoint by two renames; when the second fails (a full disk, say)
    the earlier checkpoint returns whole and verified, and no temporary folder stays."""
    from pathlib import Path

    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def save(value):
        return ckpt.save_checkpoint(tmp_path, 1, trainable={"policy": {"w": torch.full((2,), value)}},
                                    optimizer=optimizer, scheduler=scheduler, trainer_state={"global_step": 1})

    first = save(1.0)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(f"{ckpt.TMP_PREFIX}1-") and str(dst) == str(first):  # the new copy's rename
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        save(2.0)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    ckpt.verify(first)
    assert torch.equal(ckpt.load_checkpoint(first)["trainable"]["policy"]["w"], torch.full((2,), 1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
