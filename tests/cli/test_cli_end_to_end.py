"""The commands end to end on the embedded toy world with a reduced budget: train -> eval (both arms),
resume, the demo's outputs, and one-line errors for user mistakes."""

import json
from pathlib import Path

import pytest

from alignfast.cli import main

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "configs" / "toy.yaml")
SMALL = ["--total_episodes", "64", "--data.eval.limit", "24", "--save_steps", "1"]


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_train_then_eval_both_arms(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", TOY, "--trainer.output_dir", str(out), *SMALL]) == 0
    assert (out / "final" / "config.json").is_file() and (out / "checkpoint-1" / "policy").is_dir()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and "objective/scores" in metrics[0] and "objective/kl" in metrics[0]

    # The Oracle arm from the same run file: its own folder, the target's answer budget as its response length.
    before = {str(p): p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["train", "--config", TOY, "--oracle", "--trainer.output_dir", str(out), *SMALL]) == 0
    oracle = out / "oracle"
    assert json.loads((oracle / "config.json").read_text())["response_length"] == 8  # toy target_max_new_tokens
    assert {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if oracle not in p.parents and p != oracle} == before
    capsys.readouterr()
    assert main(["eval", "--config", TOY, "--checkpoint", str(out / "final"), "--oracle-checkpoint",
                 str(oracle / "checkpoint-1"), "--output-dir", str(tmp_path / "eval"), "--data.eval.limit", "24"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert list(rows) == ["No fine-tuning", "SFT prompter (before PPO)", "Align-Pro", "Oracle"]
    assert all(r[1] == "24" for r in rows.values())
    payload = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert payload["baseline"] == "No fine-tuning" and [a["name"] for a in payload["arms"]] == list(rows)
    for arm in payload["arms"][1:]:
        assert 0.0 <= arm["win_rate"] <= 1.0 and arm["wins"] + arm["ties"] + arm["losses"] == 24
    rollouts = (tmp_path / "eval" / "eval_rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 4 * 24

    # The SFT arm is the run file's prompter.model, untrained: what eval of that model as --checkpoint gives.
    from alignfast.toy import load_world

    assert main(["eval", "--config", TOY, "--checkpoint", load_world().prompter_path, "--no-sft",
                 "--output-dir", str(tmp_path / "eval_sft"), "--data.eval.limit", "24"]) == 0
    assert list(_table_rows(capsys.readouterr().out)) == ["No fine-tuning", "Align-Pro"]
    arms = {}
    for line in rollouts + (tmp_path / "eval_sft" / "eval_rollouts.jsonl").read_text().splitlines():
        row = json.loads(line)
        arms.setdefault(row.pop("arm"), []).append(row)
    assert arms["SFT prompter (before PPO)"] == arms["Align-Pro"][24:]  # the second eval's Align-Pro rows

    # The run folder itself (its config.json is the trainer's) is named as such, with the folders to pass.
    assert main(["eval", "--config", TOY, "--checkpoint", str(out), "--data.eval.limit", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a training run's folder" in err[0] and "final" in err[0], err


def test_resume_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", TOY, "--trainer.output_dir", str(out), "--save_steps", "1"]
    assert main([*args, "--total_episodes", "64"]) == 0
    assert main([*args, "--total_episodes", "128", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_one_model_in_both_roles_is_held_once(tmp_path, caplog):
    """The issue's first real run used one chat model as prompter and target: the CLI's target is frozen, so
    the trainer serves the reference policy from it instead of a third copy (share_frozen_weights)."""
    import logging

    caplog.set_level(logging.INFO, logger="alignfast.trainer")
    out = tmp_path / "run"
    assert main(["train", "--config", TOY, "--prompter.model", "toy:target", "--trainer.output_dir", str(out),
                 "--total_episodes", "64", "--save_strategy", "no"]) == 0
    assert "holding the frozen weights once: reference = target" in caplog.text

def test_demo_writes_the_comparison(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--episodes", "64"]) == 0
    printed = capsys.readouterr().out
    rows = _table_rows(printed)
    assert list(rows)[:4] == ["No fine-tuning", "SFT prompter (before PPO)", "Align-Pro", "Oracle (PPO on the target)"]
    assert "Aligner (SFT)" in rows  # trained by SFT in the same run (alignfast.cli.demo_aligner)
    assert "Proxy-RLHF (proxy on the target's decoding)" in rows  # alignfast.cli.demo_proxy
    assert "Before and after Align-Pro" in printed and "prompt: 'sort" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["episodes"] == 64 and results["held_out_prompts"] == 250
    assert {"align_pro_train_s", "oracle_train_s", "proxy_rlhf_s", "total_s"} <= set(results["timings_s"])
    assert (tmp_path / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "align_pro" / "metrics.jsonl").is_file() and (tmp_path / "oracle" / "metrics.jsonl").is_file()
    # A rerun that skips arms removes their earlier folders (they sat beside results that did not list them).
    assert main(["demo", "--output-dir", str(tmp_path), "--episodes", "64", "--seed", "1", "--no-oracle",
                 "--no-proxy", "--no-aligner"]) == 0
    assert not any((tmp_path / arm).exists() for arm in ("oracle", "proxy_rlhf", "aligner"))
    assert json.loads((tmp_path / "results.json").read_text())["seed"] == 1
    # ... but never in a folder no demo wrote: a training run's oracle/ there is the user's.
    (tmp_path / "train_run" / "oracle").mkdir(parents=True)
    assert main(["demo", "--output-dir", str(tmp_path / "train_run"), "--episodes", "64", "--no-oracle",
                 "--no-proxy", "--no-aligner"]) == 0
    assert (tmp_path / "train_run" / "oracle").is_dir()


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_eval_checks_what_it_is_given(tmp_path, capsys):
    """Found by a review of `alignfast eval`, each passing silently before: another arm's model scored and labelled
    as the flag's arm; settings other than the checkpoint's training run; a second checkpoint's reports replacing
    the first's; a NaN reward named no arm or reward; several target samples per prompt written as one."""
    out = tmp_path / "run"
    assert main(["train", "--config", TOY, "--trainer.output_dir", str(out), *SMALL]) == 0
    assert main(["train", "--config", TOY, "--oracle", "--trainer.output_dir", str(out), *SMALL]) == 0
    capsys.readouterr()
    evaluate = ["eval", "--config", TOY, "--data.eval.limit", "8"]
    assert main([*evaluate, "--checkpoint", str(out / "oracle" / "final")]) == 2
    assert "trained as the oracle arm, not align_pro: pass it as --oracle-checkpoint" in _error(capsys)
    assert main([*evaluate, "--oracle-checkpoint", str(out / "checkpoint-1")]) == 2
    assert "trained as the align_pro arm, not oracle: pass it as --checkpoint" in _error(capsys)
    assert main([*evaluate, "--proxy-checkpoint", str(out / "final")]) == 2
    assert "was trained as the align_pro arm: pass it as --checkpoint" in _error(capsys)
    assert main([*evaluate, "--checkpoint", str(out / "final"), "--prompter.model", "null"]) == 2
    assert "needs 'prompter.model'" in _error(capsys)
    # the target's budget is named as the setting, not as the engine's 'max_new_tokens' argument
    assert main([*evaluate, "--checkpoint", str(out / "final"), "--target_max_new_tokens", "64", "--no-sft"]) == 2
    assert "argument 'target_max_new_tokens' (64) leaves no room for a prompt" in _error(capsys)

    # A setting other than training's is said, and recorded; the default folder keeps another checkpoint's reports.
    assert main([*evaluate, "--checkpoint", str(out / "final"), "--response_length", "3", "--no-sft"]) == 0
    assert "trained with response_length=" in capsys.readouterr().err
    report = json.loads((out / "eval.json").read_text())
    assert report["settings_differ_from_training"]["--checkpoint"]["response_length"]["evaluated"] == 3
    assert main([*evaluate, "--checkpoint", str(out / "checkpoint-1"), "--no-sft"]) == 2
    assert f"holds an evaluation of other checkpoints (there: --checkpoint {out / 'final'}; here: --checkpoint " \
           f"{out / 'checkpoint-1'})" in _error(capsys)
    # the same checkpoint however spelled is no other checkpoint
    assert main([*evaluate, "--checkpoint", str(out / "final") + "/", "--no-sft"]) == 0
    capsys.readouterr()

    assert main([*evaluate, "--checkpoint", str(out / "final"), "--no-sft", "--output-dir", str(tmp_path / "nan"),
                 "--reward.functions", f"[{__name__}:nan_reward]"]) == 2
    assert "arm 'No fine-tuning': prompt 0" in (line := _error(capsys)) and "'nan_reward'" in line

    assert main([*evaluate, "--checkpoint", str(out / "final"), "--no-sft", "--output-dir", str(tmp_path / "n2"),
                 "--target_num_samples", "2", "--target_temperature", "1.0"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "n2" / "eval_rollouts.jsonl").read_text().splitlines()]
    assert all(len(r["answers"]) == 2 and r["answer"] == r["answers"][0] for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "no/such.yaml"], "config file not found"),
    (["train", "--config", TOY, "--trainer.klcoef", "1"], "unknown key 'trainer.klcoef'; did you mean 'kl_coef'"),
    (["train", "--config", TOY, "--prompter.model", "no-org/no-model"], "cannot load the prompter"),
    (["train", "--config", TOY, "--kl_coef", "nan"], "'kl_coef'"),
    (["eval", "--config", TOY, "--checkpoint", "no/such/dir"], "checkpoint not found"),
    (["demo", "--episodes", "0"], "--episodes must be >= 1"),
    (["train", "--config", TOY, "--data.train.limit", "abc"], "data.train.limit must be an integer >= 1, got 'abc'"),
    (["train", "--config", TOY, "--data.eval.shuffle_seed", "-1"], "data.eval.shuffle_seed must be an integer >= 0"),
    # accepted and then ignored until 2026-12-01
    (["train", "--config", TOY, "--reward.template", "{prompt}::{completion}"], "trainer.reward_template"),
    # one place in a run file for the target's system message, whatever its engine
    (["train", "--config", TOY, "--trainer.target_system_prompt", "be brief"],
     "system message as target.system_prompt"),
    (["train", "--config", TOY, "--target.system_prompt", "''"], "error: target.system_prompt must be a non-empty"),
    # from a review that followed the README as a new user
    (["train", "--config", str(ROOT / "configs" / "proxy_toy.yaml")], "is a Proxy-RLHF setting: add --method proxy"),
    (["train", "--config", TOY, "--trainer.lerning_rate", "1"], "did you mean 'learning_rate'?"),
    (["train", "--config", TOY, "--data.eval", "toy:evl"],
     "unknown toy data set 'toy:evl' (use toy:train or toy:eval)"),
    (["demo", "--episodes", "10"], "--episodes (10) is smaller than one PPO batch"),
])
def test_user_errors_are_one_line(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # a case that is not refused would train into ./alignfast-toy: never the checkout's
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def nan_reward(prompts, completions, **columns):
    """A broken reward function (used by name from the command line below)."""
    return [float("nan")] * len(completions)


def test_training_stop_on_nan_is_one_line(tmp_path, capsys):
    argv = ["train", "--config", TOY, "--trainer.output_dir", str(tmp_path / "run"), "--total_episodes", "64",
            "--reward.functions", f"[{__name__}:nan_reward]"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite reward nan at step 1" in err[0] and "nan_reward" in err[0], err


def test_output_path_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main(["demo", "--output-dir", str(tmp_path / "file" / "sub"), "--episodes", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Not a directory" in err[0] and str(tmp_path / "file") in err[0], err


def test_missing_engine_package_is_one_line(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    assert main(["train", "--config", TOY, "--target.engine", "vllm", "--trainer.output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install" in err[0] and "vllm" in err[0], err


@pytest.mark.parametrize("argv", [
    ["train", "--config", TOY],
    ["train", "--config", str(ROOT / "configs" / "proxy_toy.yaml"), "--method", "proxy"],
    ["aligner", "train", "--config", str(ROOT / "configs" / "aligner_toy.yaml")],
], ids=["alignpro", "proxy", "aligner"])
def test_a_tracker_that_is_not_installed_fails_before_any_model_loads(argv, tmp_path, capsys, monkeypatch):
    """The GPU run files set report_to: tensorboard; without tensorboard installed the error came after the
    prompter, the 8B target and the reward model had loaded."""
    import importlib.util

    from alignfast.cli import models

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    loaded = []
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loaded.append(a) or 1 / 0)
    assert main([*argv, "--trainer.output_dir", str(tmp_path / "o"), "--report_to", "tensorboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report_to" in err[0] and "pip install tensorboard" in err[0] and not loaded, err
