"""`alignfast train --method proxy` on configs/proxy_toy.yaml: it trains, writes its run under
<output_dir>/proxy, resumes, and a bad proxy setting is a one-line error naming it."""

from __future__ import annotations

import json
from pathlib import Path

from alignfast.cli import main

RUN = str(Path(__file__).resolve().parents[2] / "configs" / "proxy_toy.yaml")


def test_train_method_proxy_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", RUN, "--method", "proxy", "--trainer.output_dir", str(out),
            "--per_device_train_batch_size", "8", "--num_mini_batches", "1", "--save_steps", "1",
            "--target_max_new_tokens", "4"]
    assert main([*args, "--total_episodes", "8"]) == 0
    assert main([*args, "--total_episodes", "16", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "proxy" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (out / "proxy" / "final" / "proxy.safetensors").is_file()

    # Resumed without --method proxy: the error names the arms (it named two equal value_head settings).
    capsys.readouterr()
    toy = str(Path(RUN).parent / "toy.yaml")
    assert main(["train", "--config", toy, "--trainer.output_dir", str(tmp_path / "other"), "--resume",
                 str(out / "proxy" / "checkpoint-1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written by the 'proxy' arm and this is the 'align_pro' arm" in err[0], err
    assert "--method proxy --resume" in err[0] and "value_head" not in err[0], err


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
    # A run file that trained with periodic evaluation still evaluates (the trainer built here only decodes; an
    # eval_steps without its eval set was refused there once the trainer checked it).
    assert main([*common, "--proxy-checkpoint", str(accept), "--output-dir", str(tmp_path / "e"),
                 "--trainer.eval_steps", "10"]) == 0


def test_a_proxy_given_to_another_arms_flag_names_its_own(tmp_path, capsys):
    proxy = _saved_proxy(tmp_path, 30.0)
    assert main(["eval", "--config", RUN, "--checkpoint", str(proxy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a Proxy-RLHF proxy (`alignfast train --method proxy`): pass it as " \
                             "--proxy-checkpoint" in err[0], err


def test_eval_proxy_checkpoint_that_is_not_a_proxy_is_one_line(tmp_path, capsys):
    (tmp_path / "run" / "proxy" / "final").mkdir(parents=True)
    assert main(["eval", "--config", RUN, "--proxy-checkpoint", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--proxy-checkpoint" in err[0] and "proxy/final" in err[0]


def test_proxy_runs_get_the_checks_the_other_methods_get(tmp_path, capsys, monkeypatch):
    """--method proxy went its own way past three of `alignfast train`'s checks: a reward module beside the run file
    was not found, an output_dir holding a run was refused only after the target had loaded, and the thread count
    was not fitted to the free cores. Now: the module beside the run file is used, the full output_dir fails before
    any model loads, and the thread check runs."""
    import yaml

    from alignfast.cli import models, threads

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "my_rewards.py").write_text(
        "def score(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n")
    run = yaml.safe_load(Path(RUN).read_text())
    run["reward"]["functions"] = ["my_rewards:score"]
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump(run))
    monkeypatch.chdir(tmp_path)  # not the run file's folder: the module is found beside the run file
    fitted = []
    real_fit = threads.fit_threads_to_machine
    monkeypatch.setattr(threads, "fit_threads_to_machine", lambda *a, **k: (fitted.append(1), real_fit(*a, **k))[1])
    args = ["train", "--config", str(tmp_path / "cfg" / "run.yaml"), "--method", "proxy", "--trainer.output_dir",
            str(tmp_path / "out"), "--per_device_train_batch_size", "8", "--num_mini_batches", "1",
            "--total_episodes", "8", "--target_max_new_tokens", "4"]
    assert main(args) == 0, capsys.readouterr().err
    assert fitted == [1]
    assert "objective/scores" in (tmp_path / "out" / "proxy" / "metrics.jsonl").read_text()

    loaded = []
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loaded.append(a) or 1 / 0)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and not loaded, err


def test_oracle_with_another_method_is_refused(capsys):
    for method in ("proxy", "alignpro"):
        assert main(["train", "--config", RUN, "--oracle", "--method", method]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--oracle" in err[0] and f"--method {method}" in err[0], err


def _wtl(out: Path, arm: str) -> tuple[int, int, int]:
    row = {a["name"]: a for a in json.loads((out / "eval.json").read_text())["arms"]}[arm]
    return row["wins"], row["ties"], row["losses"]


def test_an_accepting_proxy_ties_no_fine_tuning_at_every_top_p_and_top_k(tmp_path):
    """No fine-tuning was decoded by the HF engine, the proxy's arm by the proxy's decoder, whose nucleus and top-k
    are not the engine's sampling rule: an always-accepting proxy won and lost prompts at top_p 0.9 (23 / 189 / 38
    of 250 in a review's run). Now No fine-tuning is the same decoder with every proposal accepted."""
    accept = _saved_proxy(tmp_path, 50.0)
    common = ["eval", "--config", RUN, "--data.eval.limit", "40", "--proxy-checkpoint", str(accept),
              "--target_temperature", "1.0", "--target_max_new_tokens", "6"]
    for name, extra in (("p", ["--target_top_p", "0.9"]), ("k", ["--target_top_k", "3"]),
                        ("pk", ["--target_top_p", "0.8", "--target_top_k", "5", "--seed", "7"])):
        out = tmp_path / name
        assert main([*common, *extra, "--output-dir", str(out)]) == 0
        answers = _arm_answers(out)
        assert answers["Proxy-RLHF"] == answers["No fine-tuning"], name
        assert _wtl(out, "Proxy-RLHF") == (0, 40, 0), name
        assert "proxy's decoder" in json.loads((out / "eval.json").read_text())["no_fine_tuning_decoding"]


def _trained_proxy(tmp_path) -> Path:
    out = tmp_path / "trained"
    assert main(["train", "--config", RUN, "--method", "proxy", "--trainer.output_dir", str(out),
                 "--per_device_train_batch_size", "8", "--num_mini_batches", "1", "--total_episodes", "8",
                 "--target_max_new_tokens", "4", "--save_steps", "1"]) == 0
    return out / "proxy" / "final"


def _other_targets(tmp_path) -> tuple[Path, Path]:
    """(a target of the toy's width with another vocabulary, the toy target with one weight changed)."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignfast.toy import load_world

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.trainer.tiny import make_causal_lm, make_tokenizer

    vocab = tmp_path / "other-vocab"
    tok = make_tokenizer(vocab, [f"w{i}" for i in range(40)] + ["sort", "the", "numbers", ":"])
    make_causal_lm(vocab, len(tok), hidden=96, layers=1, heads=2)
    toy = load_world().target_path
    retrained = tmp_path / "retrained"
    model = AutoModelForCausalLM.from_pretrained(toy)
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] += 1.0
    model.save_pretrained(retrained)
    AutoTokenizer.from_pretrained(toy).save_pretrained(retrained)
    return vocab, retrained


def test_eval_checks_the_target_and_settings_a_proxy_was_trained_with(tmp_path, capsys):
    """Only the proxy's feature width was checked: a proxy decoded another target with another vocabulary, under
    other decoding settings, and eval printed a table. Now its folder records the target (name, weights fingerprint,
    vocabulary size): another vocabulary is a one-line error, other weights a warning (as a resume from another
    target), and the settings it decodes under are compared with its run's (a warning each, in eval.json)."""
    final = _trained_proxy(tmp_path)
    recorded = json.loads((final / "proxy_config.json").read_text())["target"]
    assert recorded["vocab_size"] > 0 and len(recorded["weights"]) == 16 and recorded["name"]
    checkpoint = json.loads((final.parent / "checkpoint-1" / "policy" / "proxy_config.json").read_text())
    assert checkpoint["target"] == recorded
    vocab, retrained = _other_targets(tmp_path)
    common = ["eval", "--config", RUN, "--data.eval.limit", "8", "--target_max_new_tokens", "4",
              "--proxy-checkpoint", str(final)]

    capsys.readouterr()
    assert main([*common, "--target.model", str(vocab), "--output-dir", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--proxy-checkpoint" in err[0] and f"vocabulary of {recorded['vocab_size']} tokens" \
        in err[0] and "target.model" in err[0], err

    assert main([*common, "--target.model", str(retrained), "--output-dir", str(tmp_path / "w")]) == 0
    err = capsys.readouterr().err
    assert "the proxy was trained on target" in err and recorded["weights"] in err, err

    assert main([*common, "--target_top_p", "0.9", "--target_top_k", "4", "--max_rejections_per_token", "1",
                 "--output-dir", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert "the proxy was trained on target" not in err  # its own target: no warning
    differ = json.loads((tmp_path / "s" / "eval.json").read_text())["settings_differ_from_training"]
    assert differ == {"--proxy-checkpoint": {"target_top_p": {"trained": 1.0, "evaluated": 0.9},
                                             "target_top_k": {"trained": 0, "evaluated": 4},
                                             "max_rejections_per_token": {"trained": 2, "evaluated": 1}}}, differ
    assert "--trainer.target_top_p sets it" in err and "--trainer.max_rejections_per_token sets it" in err, err
    # The same checks for a checkpoint's proxy.
    assert main([*common[:-1], str(final.parent / "checkpoint-1"), "--target_top_p", "0.9",
                 "--output-dir", str(tmp_path / "c")]) == 0
    differ = json.loads((tmp_path / "c" / "eval.json").read_text())["settings_differ_from_training"]
    assert differ == {"--proxy-checkpoint": {"target_top_p": {"trained": 1.0, "evaluated": 0.9}}}, differ


def test_a_proxy_saved_without_a_target_record_still_loads(tmp_path):
    from alignfast.trainer.proxy_model import ProxyModel

    where = _saved_proxy(tmp_path, 30.0)  # what a proxy folder held before the target was recorded
    assert "target" not in json.loads((where / "proxy_config.json").read_text())
    assert ProxyModel.from_pretrained(where).trained_on is None
    assert main(["eval", "--config", RUN, "--data.eval.limit", "4", "--proxy-checkpoint", str(where),
                 "--output-dir", str(tmp_path / "o")]) == 0


def test_eval_without_a_proxy_drops_a_proxy_run_files_settings_with_a_note(tmp_path, capsys):
    """A proxy's run file given to eval for another arm failed on trainer.accept_prior with the hint "add --method
    proxy", a flag eval has not. The proxy's settings do not concern the other arms: they are dropped, with one
    warning line naming them."""
    from alignfast.toy import load_world

    prompter = str(Path(load_world().target_path).parent / "prompter")
    assert main(["eval", "--config", RUN, "--checkpoint", prompter, "--no-sft", "--data.eval.limit", "4",
                 "--output-dir", str(tmp_path / "o")]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "--method proxy" not in err and "unknown key" not in err, err
    said = [line for line in err.splitlines() if "Proxy-RLHF setting" in line]
    assert len(said) == 1 and "trainer.accept_prior" in said[0] and "trainer.max_rejections_per_token" in said[0] \
        and "not used without --proxy-checkpoint" in said[0], said
    assert "Align-Pro" in json.loads((tmp_path / "o" / "eval.json").read_text())["arms"][1]["name"]
