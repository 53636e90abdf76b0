"""The `lr` in metrics.jsonl is the rate the step's optimizer updates used, not the scheduler's next one
(a `max_steps 1` run logged 0.0 though it trained at learning_rate)."""

import json

import pytest
from transformers import AutoModelForCausalLM

from alignfast.trainer import AlignProConfig, AlignProTrainer
from tests.trainer.tiny import TRAIN_PROMPTS, FunctionTarget, keyword_reward, small_world


@pytest.mark.parametrize("schedule, steps", [("linear", 3), ("linear", 1), ("cosine", 2)])
def test_logged_lr_is_the_rate_the_updates_used(tmp_path, schedule, steps):
    tok, prompter_dir = small_world(tmp_path)
    out = tmp_path / "out"
    cfg = AlignProConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=steps, response_length=2,
                         learning_rate=1e-3, lr_scheduler_type=schedule, num_ppo_epochs=1, num_mini_batches=1,
                         save_strategy="no", rewrite_template="{prompt}")
    trainer = AlignProTrainer(cfg, AutoModelForCausalLM.from_pretrained(prompter_dir), tok,
                              FunctionTarget(lambda s: s, tok), reward_funcs=[keyword_reward],
                              train_dataset=TRAIN_PROMPTS)
    used: list[float] = []  # what the optimizer really applies, read at each update
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    trainer.train()
    logged = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(used) == steps and logged == used
    assert logged[0] == pytest.approx(1e-3)  # no warmup: the first step trains at learning_rate
    assert all(lr > 0 for lr in logged)      # the last step trained too (the old value was the schedule's 0.0)
