"""NaN / inf stop: a non-finite reward or loss stops the run with a message naming the step, writes no
checkpoint for it and leaves the last good checkpoint byte-for-byte intact."""

import hashlib

import pytest

from alignfast.trainer import TrainingDivergedError
from tests.trainer.tiny import echo_trainer, keyword_reward, small_world


def digest(directory):
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def make(tok, prompter_dir, out, reward, **overrides):
    cfg = dict(output_dir=str(out), per_device_train_batch_size=3, num_ppo_epochs=2, max_steps=5, response_length=3,
               save_steps=2, logging_steps=1, rewrite_template="{prompt}")
    cfg.update(overrides)
    return echo_trainer(tok, prompter_dir, reward=reward, **cfg)[0]


def test_nan_reward_stops_and_keeps_last_good_checkpoint(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    calls = []

    def flaky_reward(prompts, completions, **columns):
        calls.append(1)
        scores = keyword_reward(prompts, completions)
        if len(calls) == 3:
            scores[1] = float("nan")
        return scores

    trainer = make(tok, prompter_dir, tmp_path / "out", flaky_reward)
    # Save a digest of checkpoint-2 as soon as it exists, then compare after the failure.
    seen = {}

    class Snapshot:
        def on_save(self, args, state, control, **kwargs):
            seen[state.global_step] = digest(tmp_path / "out" / f"checkpoint-{state.global_step}")

    trainer.callbacks.callbacks.append(Snapshot())
    with pytest.raises(TrainingDivergedError, match=r"non-finite reward nan at step 3 .*flaky_reward") as info:
        trainer.train()
    assert info.value.step == 3
    assert info.value.checkpoint.name == "checkpoint-2"
    assert "checkpoint-2" in str(info.value)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "checkpoint-3" not in names and not [n for n in names if n.startswith(".tmp")], names
    assert digest(tmp_path / "out" / "checkpoint-2") == seen[2]


def test_float32_overflowing_reward_is_non_finite(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    trainer = make(tok, prompter_dir, tmp_path / "out", lambda p, c, **k: [1e39] * len(c))
    with pytest.raises(TrainingDivergedError, match=r"non-finite reward inf at step 1 .*overflows float32"):
        trainer.train()


def test_nan_loss_stops_with_step(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    # An absurd learning rate blows the parameters up after the first optimizer step: the next
    # forward produces non-finite logits, hence a non-finite loss, inside step 1.
    trainer = make(tok, prompter_dir, tmp_path / "out", keyword_reward, learning_rate=1e30, max_grad_norm=None,
                   adam_epsilon=1e-30)
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss at step 1: loss is nan") as info:
        trainer.train()
    assert info.value.checkpoint is None
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(("checkpoint", ".tmp"))]
