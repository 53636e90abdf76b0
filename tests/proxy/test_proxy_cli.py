"""`alignfast train --method proxy` on configs/proxy_toy.yaml: it trains, writes its run under
<output_dir>/proxy, resumes, and a bad proxy setting is a one-line error naming it."""

from __future__ import annotations

import json
from pathlib import Path

from alignfast.cli import main

RUN = str(Path(__file__).resolve().parents[2] / "configs" / "proxy_toy.yaml")


def test_train_method_proxy_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", RUN, "--method", "proxy", "--trainer.output_dir", str(out),
            "--per_device_train_batch_size", "8", "--num_mini_batches", "1", "--save_steps", "1",
            "--target_max_new_tokens", "4"]
    assert main([*args, "--total_episodes", "8"]) == 0
    assert main([*args, "--total_episodes", "16", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "proxy" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (out / "proxy" / "final" / "proxy.safetensors").is_file()


def test_bad_proxy_setting_is_one_line(tmp_path, capsys):
    assert main(["train", "--config", RUN, "--method", "proxy", "--max_rejections_per_token", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_rejections_per_token" in err[0]


def _saved_proxy(tmp_path, accept_bias: float) -> Path:
    """A proxy whose decisions do not depend on its input: P(accept) = sigmoid(accept_bias)."""
    from alignfast.toy import load_world
    from alignfast.trainer.proxy_model import ProxyModel
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(load_world().target_path)
    where = tmp_path / f"bias{accept_bias}" / "proxy" / "final"
    ProxyModel(target.config.hidden_size, target.get_input_embeddings().embedding_dim, 16,
               accept_bias=accept_bias).save_pretrained(where)
    return where


def _arm_answers(out: Path) -> dict[str, list[str]]:
    arms: dict[str, list[str]] = {}
    for line in (out / "eval_rollouts.jsonl").read_text().splitlines():
        row = json.loads(line)
        arms.setdefault(row["arm"], []).append(row["answer"])
    return arms


def test_eval_scores_a_saved_proxy_as_an_arm(tmp_path):
    """`alignfast eval --proxy-checkpoint`: the frozen target decodes under the proxy. A proxy that accepts every
    proposal leaves the greedy target's answers exactly as No fine-tuning's; one that rejects every proposal
    (up to max_rejections_per_token, then the next is forced) changes them."""
    common = ["eval", "--config", RUN, "--data.eval.limit", "24"]
    accept, reject = _saved_proxy(tmp_path, 30.0), _saved_proxy(tmp_path, -30.0)
    assert main([*common, "--proxy-checkpoint", str(accept), "--output-dir", str(tmp_path / "a")]) == 0
    assert main([*common, "--proxy-checkpoint", str(reject), "--output-dir", str(tmp_path / "r")]) == 0
    a, r = _arm_answers(tmp_path / "a"), _arm_answers(tmp_path / "r")
    assert len(a["Proxy-RLHF"]) == 24 and a["Proxy-RLHF"] == a["No fine-tuning"]
    assert r["No fine-tuning"] == a["No fine-tuning"]
    assert sum(x != y for x, y in zip(r["Proxy-RLHF"], r["No fine-tuning"])) >= 12
    arms = {arm["name"]: arm for arm in json.loads((tmp_path / "r" / "eval.json").read_text())["arms"]}
    assert arms["Proxy-RLHF"]["n"] == 24 and arms["Proxy-RLHF"]["wins"] + arms["Proxy-RLHF"]["losses"] > 0


def test_eval_proxy_checkpoint_that_is_not_a_proxy_is_one_line(tmp_path, capsys):
    (tmp_path / "run" / "proxy" / "final").mkdir(parents=True)
    assert main(["eval", "--config", RUN, "--proxy-checkpoint", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--proxy-checkpoint" in err[0] and "proxy/final" in err[0]
