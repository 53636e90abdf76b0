"""The fast backend's carried critic values (ppo_core.CarriedValues): the critic runs once, with its graph, on
the update's first micro-batch while the rollout is scored, and the update's first micro-batch uses that
forward. One critic forward over per_device_train_batch_size episodes less per PPO step, the same run otherwise:
against the same fast trainer with the carry switched off, every loss, metric and parameter agrees to float32
rounding (the scoring pass now runs the critic on the micro-batch's rows, trimmed, instead of the chunk)."""

import pytest
import torch

from alignfast.trainer.ppo_core import PPOUpdater
from tests.trainer.tiny import assert_runs_agree, echo_trainer, small_world
from tests.utils import relative_error

STEPS = 3
CFG = dict(backend="fast", seed=5, per_device_train_batch_size=2, gradient_accumulation_steps=2, num_mini_batches=2,
           num_ppo_epochs=2, max_steps=STEPS, response_length=5, temperature=0.9, kl_coef=0.1, learning_rate=3e-3,
           save_strategy="no", logging_steps=1, rewrite_template="rewrite {prompt}", value_head="separate")


def run(tmp_path, name, **overrides):
    tok, prompter_dir = small_world(tmp_path)
    trainer, rec = echo_trainer(tok, prompter_dir, output_dir=str(tmp_path / name), **{**CFG, **overrides})
    rows = {"grad": 0, "no_grad": 0}
    if trainer.value_model is None:  # a shared value head: no critic to count
        trainer.train()
        return trainer, rec, rows
    forward = trainer.value_model.forward

    def counting(query_ids, *args, **kwargs):
        rows["grad" if torch.is_grad_enabled() else "no_grad"] += query_ids.size(0)
        return forward(query_ids, *args, **kwargs)

    trainer.value_model.forward = counting
    trainer.train()
    return trainer, rec, rows


def test_carry_saves_one_micro_batch_forward_and_changes_nothing(tmp_path, monkeypatch):
    fast, rf, rows = run(tmp_path, "carry")
    assert fast.updater.carries_values()
    B = fast.config.rollout_batch_size
    micro_steps = 2 * 2 * 2  # epochs x mini-batches x micro-batches
    pdbs = CFG["per_device_train_batch_size"]
    # scoring: every episode once; update: every micro-batch but the carried one
    assert rows["grad"] == STEPS * micro_steps * pdbs
    assert rows["no_grad"] == STEPS * (B - pdbs)

    monkeypatch.setattr(PPOUpdater, "carries_values", lambda self: False)
    plain, rp, rows_plain = run(tmp_path, "plain")
    assert rows_plain["grad"] == STEPS * micro_steps * pdbs
    assert rows_plain["no_grad"] == STEPS * B  # the carry's saving: pdbs episodes per step

    assert_runs_agree(rf, rp, STEPS, ("loss/value_avg", "val/clipfrac_avg", "objective/kl", "policy/approxkl_avg"))
    for (name, a), (_, b) in zip(fast.value_model.named_parameters(), plain.value_model.named_parameters()):
        assert relative_error(a, b) <= 1e-5, name
    assert fast.value_model.head.weight.abs().sum() > 0  # the zero-initialised value head trained


@pytest.mark.parametrize("overrides", [dict(backend="reference"), dict(value_head="shared")])
def test_no_carry_where_it_does_not_apply(tmp_path, overrides):
    trainer, _, rows = run(tmp_path, "x", max_steps=1, **overrides)
    assert not trainer.updater.carries_values()
