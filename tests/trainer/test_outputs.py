"""What a run leaves behind: metrics.jsonl with TRL's metric names and the phase timings, samples,
atomic checkpoints with a size limit, a loadable final model, and trackers only when installed."""

import json

import pytest
from transformers import AutoModelForCausalLM

from alignfast.ops._checks import AlignfastArgumentError
from alignfast.trainer import AlignProConfig, AlignProTrainer
from alignfast.trainer import checkpoint as ckpt
from alignfast.trainer.metrics_logger import check_reporters
from tests.trainer.tiny import TRAIN_PROMPTS, FunctionTarget, keyword_reward, small_world

TRL_NAMES = ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
             "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
             "val/clipfrac_avg", "val/ratio", "lr", "episode"]
TIMINGS = ["timing_s/prompter_gen", "timing_s/target_gen", "timing_s/reward", "timing_s/logprobs", "timing_s/update",
           "tokens/s"]


def test_metrics_samples_checkpoints_and_model(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    out = tmp_path / "out"
    cfg = AlignProConfig(output_dir=str(out), per_device_train_batch_size=3, max_steps=4, response_length=3,
                         save_steps=1, save_total_limit=2, logging_steps=2, num_logged_samples=2, eval_steps=2,
                         rewrite_template="{prompt}")
    trainer = AlignProTrainer(cfg, AutoModelForCausalLM.from_pretrained(prompter_dir), tok,
                              FunctionTarget(lambda s: s, tok), reward_funcs=[keyword_reward],
                              train_dataset=TRAIN_PROMPTS, eval_dataset=TRAIN_PROMPTS[:2])
    trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "objective/kl" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for name in TRL_NAMES + TIMINGS + ["rewards/keyword_reward"]:
        assert all(isinstance(r[name], (int, float)) for r in train_rows), name
    assert [r["episode"] for r in train_rows] == [3, 6, 9, 12]
    eval_rows = [r for r in rows if "eval/scores" in r]
    assert [r["step"] for r in eval_rows] == [2, 4]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 4, 4] and {"prompt", "output", "answer", "score"} <= samples[0].keys()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".alignfast.lock"]  # the run's lock
    saved = trainer.save_model(tmp_path / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    for (n, p), (_, q) in zip(trainer.model.named_parameters(), reloaded.named_parameters()):
        assert (p == q).all(), n


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = ckpt.save_checkpoint(tmp_path, 1, trainable={"w": torch.ones(2)}, optimizer=opt, scheduler=sched,
                                trainer_state={"global_step": 1})
    before = (path / "trainable.pt").read_bytes()

    def broken(path):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 1, trainable={"w": torch.zeros(2)}, optimizer=opt, scheduler=sched,
                             trainer_state={"global_step": 1}, save_policy=broken)
    assert (path / "trainable.pt").read_bytes() == before  # the old checkpoint-1 is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]
    assert ckpt.load_checkpoint(path)["state"] == {"global_step": 1}


def test_trackers_only_when_installed():
    assert check_reporters(["none"]) == []
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(AlignfastArgumentError, match="'report_to' asks for tensorboard"):
            check_reporters(["tensorboard"])
    else:
        assert check_reporters(["tensorboard"]) == ["tensorboard"]


def test_eval_steps_without_an_eval_dataset_is_an_error_not_a_silent_skip(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    cfg = AlignProConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, max_steps=1,
                         response_length=3, eval_steps=2, rewrite_template="{prompt}")
    with pytest.raises(AlignfastArgumentError, match="'eval_steps' is 2 but there is no eval_dataset"):
        AlignProTrainer(cfg, AutoModelForCausalLM.from_pretrained(prompter_dir), tok,
                        FunctionTarget(lambda s: s, tok), reward_funcs=[keyword_reward], train_dataset=TRAIN_PROMPTS)
