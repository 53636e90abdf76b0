"""What a resumed run writes and says: metrics.jsonl as an uninterrupted run's, and a warning for each input the
checkpoint's run did not have (training prompts, target, reward, number of steps)."""

import json
import logging

import pytest
import torch
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


def _warnings(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if " WARNING " in line]


def test_a_resume_with_other_prompts_target_or_reward_says_so_in_one_line_each(tmp_path, capsys):
    from alignfast.cli import main
    from tests.hardening.test_cli_one_line import SMALL, TOY

    out = str(tmp_path / "run")
    run = ["train", "--config", TOY, "--trainer.output_dir", out, *SMALL]
    assert main(run) == 0
    capsys.readouterr()
    assert main([*run, "--resume"]) == 0
    assert not [w for w in _warnings(capsys) if "resuming from" in w]
    for extra, says in ((["--data.train", "toy:eval"], "with 250 training prompts where the checkpoint's run had 2000 "
                                                       "(data.train in a run file"),
                        (["--target.model", "toy:prompter"], "with another target (target.model in a run file"),
                        # the environment's max_new_tokens changes with it: one line, the config's
                        (["--target_max_new_tokens", "5"], "with settings that differ from the checkpoint's "
                                                           "(target_max_new_tokens: "),
                        (["--reward.weights", "[2.0]"], "with another reward (reward.model / reward.functions / "
                                                        "reward.weights in a run file; reward_model, reward_funcs, "
                                                        "reward_weights in Python): 2 x answer_accuracy where the "
                                                        "checkpoint's run had 1 x answer_accuracy")):
        assert main([*run, *extra, "--resume"]) == 0
        lines = [w for w in _warnings(capsys) if "resuming from" in w]
        assert len(lines) == 1 and says in lines[0], (extra, lines)

    # A checkpoint of an older alignfast recorded none of them: no such warning.
    state_file = tmp_path / "run" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key in ("train_rows", "train_fingerprint", "target", "rewards"):
        state.pop(key)
    state_file.write_text(json.dumps(state))
    (tmp_path / "run" / "checkpoint-2" / "manifest.json").unlink()  # resumed unverified, as such a checkpoint is
    assert main([*run, "--data.train", "toy:eval", "--target.model", "toy:prompter", "--reward.weights", "[2.0]",
                 "--resume"]) == 0
    assert not [w for w in _warnings(capsys) if "resuming from" in w and "unverified" not in w]


def test_a_proxy_rlhf_checkpoint_records_its_targets_weights(tmp_path, capsys):
    from alignfast.cli import main
    from alignfast.trainer import checkpoint as ckpt
    from alignfast.trainer.resume_checks import EMPTY_FINGERPRINT
    from tests.proxy.test_proxy_cli import RUN

    out = tmp_path / "run"
    args = ["train", "--config", RUN, "--method", "proxy", "--trainer.output_dir", str(out),
            "--per_device_train_batch_size", "8", "--num_mini_batches", "1", "--save_steps", "1",
            "--target_max_new_tokens", "4", "--total_episodes", "8"]
    assert main(args) == 0
    state = ckpt.load_checkpoint(out / "proxy" / "checkpoint-1")["state"]
    assert state["reference_fingerprint"] != EMPTY_FINGERPRINT
    capsys.readouterr()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignfast.toy import load_world

    world = load_world()
    other = AutoModelForCausalLM.from_pretrained(world.target_path)  # the same shapes, other weights
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    other.save_pretrained(tmp_path / "other_target")
    AutoTokenizer.from_pretrained(world.target_path).save_pretrained(tmp_path / "other_target")
    assert main([*args, "--target.model", str(tmp_path / "other_target"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the frozen target's weights differ from this run's target (target.model)" in err[0]
    # A checkpoint written before (the fingerprint of nothing) still resumes.
    state_file = out / "proxy" / "checkpoint-1" / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()),
                                      "reference_fingerprint": EMPTY_FINGERPRINT}))
    (out / "proxy" / "checkpoint-1" / "manifest.json").unlink()
    assert main([*args, "--resume"]) == 0


def test_a_resume_with_another_reward_models_weights_under_the_same_name_says_so(tmp_path, caplog):
    from alignfast.rollout.rewards import RewardModel
    from alignfast.trainer import checkpoint as ckpt
    from tests.trainer.tiny import make_reward_model

    tok, prompter_dir = small_world(tmp_path)
    for seed, folder in ((6, "a"), (7, "b")):  # one name ('reward'), two sets of weights
        make_reward_model(tmp_path / folder / "reward", len(tok), seed=seed, hidden=16)
        tok.save_pretrained(str(tmp_path / folder / "reward"))
    out = tmp_path / "run"

    def run(folder, first=False):
        # Resumes write no checkpoint (each resumes from checkpoint-1 alone); a constant LR: a resume over more
        # steps says nothing of its schedule.
        saves = {"save_steps": 1} if first else {"save_strategy": "no"}
        rm = RewardModel(str(tmp_path / folder / "reward"))
        t = AlignProTrainer(AlignProConfig(output_dir=str(out), **{**BASE, "max_steps": 1 if first else 2, **saves,
                                                                   "lr_scheduler_type": "constant"}),
                            AutoModelForCausalLM.from_pretrained(prompter_dir), tok, FunctionTarget(lambda s: s, tok),
                            reward_model=rm, train_dataset=TRAIN_PROMPTS)
        with caplog.at_level(logging.WARNING, logger="alignfast.trainer"):
            t.train(resume_from_checkpoint=None if first else str(out / "checkpoint-1"))
        return [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]

    run("a", first=True)
    state = ckpt.load_checkpoint(out / "checkpoint-1")["state"]
    assert list(state["reward_models"]) == ["reward"] and state["rewards"] == [["reward", 1.0]]
    assert run("a") == []
    caplog.clear()
    lines = run("b")
    assert len(lines) == 1 and "with another reward model's weights under the same name (reward.model in a run " \
                               "file; reward_model in Python): 'reward' differ" in lines[0], lines

    # A checkpoint of an older alignfast recorded no reward model weights: it resumes, without that warning.
    caplog.clear()
    state_file = out / "checkpoint-1" / "trainer_state.json"
    state_file.write_text(json.dumps({k: v for k, v in json.loads(state_file.read_text()).items()
                                      if k != "reward_models"}))
    (out / "checkpoint-1" / "manifest.json").unlink()
    assert [m for m in run("b") if "unverified" not in m] == []


def test_the_first_resumed_step_runs_at_the_rebuilt_schedules_learning_rate(tmp_path):
    """Extending a finished 3-step run (linear decay) to 6 steps: the first resumed step ran at the old schedule's
    last learning rate (its optimizer's), and the rebuilt schedule started a step late; step 4 now runs at the
    rebuilt schedule's value for step 4, lr0 * (1 - 3/6)."""
    tok, prompter_dir = small_world(tmp_path)
    out = tmp_path / "run"
    trainer(tok, prompter_dir, out, max_steps=3, save_steps=3, lr_scheduler_type="linear").train()
    trainer(tok, prompter_dir, out, max_steps=6, save_steps=3, lr_scheduler_type="linear").train(
        resume_from_checkpoint=True)
    lr0 = BASE["learning_rate"]
    lrs = [r["lr"] for r in _lines(out / "metrics.jsonl")]
    want = [lr0 * (1 - k / 3) for k in range(3)] + [lr0 * (1 - k / 6) for k in range(3, 6)]
    assert lrs == pytest.approx(want, rel=1e-12), lrs


def test_a_proxy_resumed_at_another_size_names_the_proxys_settings(tmp_path, capsys):
    """The shape error blamed 'another model, or another LoRA rank?' for a proxy, which has no LoRA: its shapes come
    from its target's hidden size and proxy_hidden_size, which the line now names."""
    from alignfast.cli import main
    from tests.proxy.test_proxy_cli import RUN

    args = ["train", "--config", RUN, "--method", "proxy", "--trainer.output_dir", str(tmp_path / "run"),
            "--per_device_train_batch_size", "8", "--num_mini_batches", "1", "--save_steps", "1",
            "--target_max_new_tokens", "4", "--total_episodes", "8"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--proxy_hidden_size", "24", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "proxy parameter 'inp.weight' has shape" in err[0] and "in this proxy (another target, " \
        "whose hidden size sets the proxy's input (target.model), or another proxy_hidden_size?)" in err[0], err
