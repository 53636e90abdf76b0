"""What a resumed run writes and says: metrics.jsonl as an uninterrupted run's, and a warning for each input the
checkpoint's run did not have (training prompts, target, reward, number of steps)."""

import json
import logging

from transformers import AutoModelForCausalLM

from alignfast.trainer import AlignProConfig, AlignProTrainer
from tests.trainer.tiny import TRAIN_PROMPTS, FunctionTarget, Recorder, keyword_reward, small_world

BASE = dict(seed=3, per_device_train_batch_size=3, num_mini_batches=1, num_ppo_epochs=1, response_length=4,
            temperature=1.0, learning_rate=5e-3, logging_steps=1, rewrite_template="{prompt}")


def trainer(tok, prompter_dir, out, *, target=lambda s: s, rewards=(keyword_reward,), weights=None,
            prompts=TRAIN_PROMPTS, stop_at=None, **cfg):
    rec = Recorder(stop_at)
    t = AlignProTrainer(AlignProConfig(output_dir=str(out), **{**BASE, **cfg}),
                        AutoModelForCausalLM.from_pretrained(prompter_dir), tok, FunctionTarget(target, tok),
                        reward_funcs=list(rewards), reward_weights=weights, train_dataset=prompts,
                        eval_dataset=TRAIN_PROMPTS[:2], callbacks=[rec])
    rec.trainer = t
    return t


def _lines(path):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("timing")}
            for line in path.read_text().splitlines()]


def test_a_resumed_run_writes_the_metrics_lines_of_an_uninterrupted_one(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    cfg = dict(max_steps=6, save_steps=2, eval_steps=2)
    trainer(tok, prompter_dir, tmp_path / "full", **cfg).train()
    trainer(tok, prompter_dir, tmp_path / "split", stop_at=3, **cfg).train()  # checkpoint-3 on the stop
    trainer(tok, prompter_dir, tmp_path / "split", **cfg).train(resume_from_checkpoint=True)
    full, split = _lines(tmp_path / "full" / "metrics.jsonl"), _lines(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in full] == [1, 2, 2, 3, 4, 4, 5, 6, 6]
    assert [sorted(r) for r in split] == [sorted(r) for r in full]
    assert [r["step"] for r in split] == [r["step"] for r in full]
    keys = ("objective/scores", "eval/scores", "lr")
    assert [{k: r.get(k) for k in keys} for r in split] == [{k: r.get(k) for k in keys} for r in full]


def test_a_resume_over_another_number_of_steps_says_the_lr_schedule_changes(tmp_path, caplog):
    import pytest

    from alignfast.trainer.resume_checks import CheckpointMismatchError

    tok, prompter_dir = small_world(tmp_path)
    out = tmp_path / "run"
    trainer(tok, prompter_dir, out, max_steps=6, save_steps=3, stop_at=3, lr_scheduler_type="linear").train()
    with caplog.at_level(logging.WARNING, logger="alignfast.trainer"):
        t = trainer(tok, prompter_dir, out, max_steps=4, save_steps=3, lr_scheduler_type="linear")
        t.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    lines = [r.getMessage() for r in caplog.records]
    assert any("with 4 steps where its run had 6 (total_episodes / max_steps / num_train_epochs): the linear "
               "learning-rate schedule is rebuilt over 4 steps, so from step 4 on" in m for m in lines), lines
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint-3: it is at step 3 and this run's total_episodes "
                                                      r"/ max_steps / num_train_epochs give 2 steps"):
        trainer(tok, prompter_dir, out, max_steps=2, lr_scheduler_type="linear").train(
            resume_from_checkpoint=str(out / "checkpoint-3"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignfast.trainer"):  # changes the numbers: not neutral
        trainer(tok, prompter_dir, out, max_steps=4, lr_scheduler_type="linear", gradient_checkpointing=True).train(
            resume_from_checkpoint=str(out / "checkpoint-3"))
    assert any("gradient_checkpointing: False -> True" in r.getMessage() for r in caplog.records)
