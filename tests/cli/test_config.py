"""The run file of `alignfast train/eval`: sections, dotted overrides, unknown keys, data and model loading."""

import json

import pytest

from alignfast.cli.config import load_run_config, parse_overrides
from alignfast.cli.data import load_prompts
from alignfast.cli.errors import CLIError
from alignfast.cli.models import import_callable, load_causal_lm, torch_dtype

RUN = """
prompter: {model: ./p, dtype: bf16}
target: {model: ./t, engine: hf}
reward: {functions: ["alignfast.eval.metrics:win_rate"]}
data: {train: prompts.jsonl, eval: {path: held.csv, prompt_column: question, limit: 2}}
trainer: {kl_coef: 0.05, learning_rate: 1.0e-5}
"""


def test_overrides_parse_yaml_scalars():
    pairs = parse_overrides(["--trainer.kl_coef", "0.1", "--target.model=./llama", "--flag", "true", "--xs", "[1, 2]"])
    assert pairs == [("trainer.kl_coef", 0.1), ("target.model", "./llama"), ("flag", True), ("xs", [1, 2])]
    with pytest.raises(CLIError, match="has no value"):
        parse_overrides(["--trainer.kl_coef"])
    with pytest.raises(CLIError, match="unexpected argument 'oops'"):
        parse_overrides(["oops"])


def test_file_then_overrides_and_bare_trainer_keys(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(RUN)
    cfg = load_run_config(f, ["--kl_coef", "0.2", "--prompter.model", "./other", "--trainer.seed=3"],
                          trainer_fields={"kl_coef", "seed"})
    assert cfg["trainer"] == {"kl_coef": 0.2, "learning_rate": 1e-5, "seed": 3}
    assert cfg["prompter"]["model"] == "./other"
    assert cfg["data"]["train"] == {"path": "prompts.jsonl"}  # a bare path becomes {path: ...}



def test_relative_paths_in_the_file_are_found_beside_it(tmp_path, monkeypatch):
    """data paths and local model folders written in the run file are taken from its folder when it holds
    them (a run started from anywhere finds them); otherwise, and for command-line overrides, the working
    directory's; hub names, toy sets and an openai target's served model name are never rewritten."""
    runs, cwd = tmp_path / "runs", tmp_path / "cwd"
    (runs / "data").mkdir(parents=True)
    (runs / "data" / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    (runs / "sft").mkdir()
    (runs / "llama").mkdir()
    cwd.mkdir()
    (cwd / "held.csv").write_text("prompt\nhello\n")
    monkeypatch.chdir(cwd)
    f = runs / "run.yaml"
    f.write_text("prompter: {model: sft, tokenizer: HuggingFaceTB/SmolLM2-135M-Instruct}\n"
                 "target: {model: llama, engine: openai, base_url: 'http://h:1/v1'}\n"
                 "data: {train: data/prompts.jsonl, eval: held.csv}\n")
    cfg = load_run_config(f, ["--data.eval.path", "data/prompts.jsonl"])
    assert cfg["data"]["train"]["path"] == str(runs / "data" / "prompts.jsonl")
    assert cfg["prompter"]["model"] == str(runs / "sft")
    assert cfg["prompter"]["tokenizer"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub name, untouched
    assert cfg["target"]["model"] == "llama"  # the server's name for its model
    assert cfg["data"]["eval"]["path"] == "data/prompts.jsonl"  # an override stays the shell's (cwd) path
    assert load_prompts(cfg["data"]["train"], what="train")[0]["prompt"] == "hi"
    f.write_text("data: {train: held.csv, eval: toy:prompts}\n")  # not beside the file: the working directory's
    cfg = load_run_config(f)
    assert cfg["data"]["train"]["path"] == "held.csv" and cfg["data"]["eval"]["path"] == "toy:prompts"
    assert load_prompts(cfg["data"]["train"], what="train")[0]["prompt"] == "hello"

@pytest.mark.parametrize("text, overrides, message", [
    ("prompter: {modle: x}", [], "unknown key 'prompter.modle'"),
    ("promter: {model: x}", [], "unknown config section 'promter'"),
    ("data: {train: {path: a.jsonl, colum: x}}", [], "unknown key 'data.train.colum'"),
    ("- a\n- b", [], "must hold a mapping"),
    ("prompter: [unclosed", [], "not valid YAML"),
    ("", ["--lr", "1"], "unknown setting --lr"),
])
def test_bad_run_files_are_one_clear_line(tmp_path, text, overrides, message):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(CLIError, match=message) as info:
        load_run_config(f, overrides, trainer_fields={"kl_coef"})
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(CLIError, match="config file not found"):
        load_run_config(tmp_path / "nope.yaml")


def test_prompts_from_jsonl_csv_json_keep_extra_columns(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "hi", "answer": "1"}) + "\n\n"
                                      + json.dumps({"prompt": "yo", "answer": "2"}) + "\n")
    (tmp_path / "b.csv").write_text("question,gold\nwhat?,x\nwhy?,y\nhow?,z\n")
    (tmp_path / "c.json").write_text(json.dumps({"prompt": ["p1", "p2"], "k": [1, 2]}))
    assert load_prompts({"path": str(tmp_path / "a.jsonl")}, what="train") == [
        {"prompt": "hi", "answer": "1"}, {"prompt": "yo", "answer": "2"}]
    rows = load_prompts({"path": str(tmp_path / "b.csv"), "prompt_column": "question", "limit": 2}, what="eval")
    assert rows == [{"prompt": "what?", "gold": "x"}, {"prompt": "why?", "gold": "y"}]
    assert load_prompts({"path": str(tmp_path / "c.json")}, what="train")[1] == {"prompt": "p2", "k": 2}
    shuffled = load_prompts({"path": str(tmp_path / "b.csv"), "prompt_column": "question", "shuffle_seed": 0},
                            what="eval")
    assert sorted(r["prompt"] for r in shuffled) == ["how?", "what?", "why?"]


def test_prompts_and_corrections_from_a_local_dataset_folder(tmp_path, monkeypatch):
    """A dataset repository cloned for offline use is a folder: `datasets` reads it as it reads a hub name (a folder
    used to be taken for a file and refused as "file not found"). Split slicing works as for a hub name."""
    pytest.importorskip("datasets")
    from alignfast.cli.aligner_data import load_rows

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "my_set"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "answer": str(i)}) + "\n"
                                                for i in range(4)))
    rows = load_prompts({"path": str(folder), "split": "train[1:3]"}, what="train")
    assert rows == [{"prompt": "p1", "answer": "1"}, {"prompt": "p2", "answer": "2"}]
    aligner = tmp_path / "corrections"
    aligner.mkdir()
    (aligner / "train.jsonl").write_text(json.dumps({"query": "q", "answer": "a", "correction": "c"}) + "\n")
    assert load_rows({"path": str(aligner), "prompt_column": "query"}, what="train") == [
        {"question": "q", "answer": "a", "correction": "c"}]


def test_bad_prompt_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\nnot json\n')
    (tmp_path / "col.jsonl").write_text('{"text": "ok"}\n')
    (tmp_path / "empty.jsonl").write_text('{"prompt": "  "}\n')
    with pytest.raises(CLIError, match="line 2 is not JSON"):
        load_prompts({"path": str(tmp_path / "bad.jsonl")}, what="train")
    with pytest.raises(CLIError, match="no column 'prompt' \\(columns: text\\)"):
        load_prompts({"path": str(tmp_path / "col.jsonl")}, what="train")
    with pytest.raises(CLIError, match="record 0 .* has no text"):
        load_prompts({"path": str(tmp_path / "empty.jsonl")}, what="train")
    with pytest.raises(CLIError, match="file not found"):
        load_prompts({"path": str(tmp_path / "missing.jsonl")}, what="train")


def test_model_not_found_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CLIError, match="cannot load the prompter model: 'no-such-org/no-such-model' is not a local "
                                      "directory and is not in the Hugging Face cache") as info:
        load_causal_lm({"model": "no-such-org/no-such-model"}, "prompter")
    assert "\n" not in str(info.value)


def test_uncached_name_offline_never_reaches_the_loader(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE set after huggingface_hub was imported (as a user's shell or a test does): a name that is
    neither a folder nor cached fails at once. Handing it to transformers with local_files_only=True is not
    enough: transformers 5 still asks the hub for an adapter config (~25 s of retries and warnings)."""
    from alignfast.cli import models

    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CLIError, match="not in the Hugging Face cache"):
        models._load(lambda *a, **k: calls.append((a, k)), "no-such-org/no-such-model", "target model")
    assert calls == []
    # A local folder goes to the loader, offline, with the local-only extras.
    folder = tmp_path / "model"
    folder.mkdir()
    models._load(lambda *a, **k: calls.append((a, k)), str(folder), "target model", local_kwargs={"x": 1}, dtype=None)
    assert calls == [((str(folder),), {"local_files_only": True, "x": 1})]


def test_unreachable_hub_fails_at_once(monkeypatch):
    import socket

    from alignfast.cli import models

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in models._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(CLIError, match="does not resolve .*no network here"):
        models._load(lambda *a, **k: calls.append(a), "no-such-org/no-such-model", "reward model")
    assert calls == []


def test_dtype_and_callable_lookup():
    import torch

    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype(None) is None and torch_dtype("auto") == "auto"
    with pytest.raises(CLIError, match="unknown dtype 'fp8'"):
        torch_dtype("fp8")
    assert import_callable("alignfast.eval.metrics:win_rate", "reward function").__name__ == "win_rate"
    with pytest.raises(CLIError, match="has no callable 'nope'"):
        import_callable("alignfast.eval.metrics:nope", "reward function")
    with pytest.raises(CLIError, match="must look like"):
        import_callable("no_colon", "reward function")


def test_target_engines_build_from_the_run_file(monkeypatch):
    from alignfast.cli.build import build_target_engine
    from alignfast.rollout import OpenAIEngine

    monkeypatch.setenv("MY_KEY", "sk-test")
    config = {"target": {"model": "served-model", "engine": "openai", "base_url": "http://127.0.0.1:9/v1",
                         "api": "chat", "api_key_env": "MY_KEY", "max_concurrency": 3, "timeout": 2.5,
                         "max_retries": 1}}
    engine, tokenizer = build_target_engine(config, device="cpu")
    assert isinstance(engine, OpenAIEngine) and tokenizer is None
    assert engine.api == "chat" and engine.max_concurrency == 3
    with pytest.raises(CLIError, match="target.engine must be one of hf, vllm, openai"):
        build_target_engine({"target": {"model": "m", "engine": "tgi"}}, device="cpu")
    with pytest.raises(CLIError, match="needs 'target.base_url'"):
        build_target_engine({"target": {"model": "m", "engine": "openai"}}, device="cpu")


def test_the_target_system_prompt_goes_where_the_target_formats_its_input():
    """A local target (hf, vllm): the trainer's target_system_prompt, put in its chat template; an OpenAI-compatible
    one: the engine's system message (its server applies the template), and nothing in the trainer; the Oracle,
    which runs the target here, always takes it."""
    from alignfast.cli.build import build_target_engine, trainer_config
    from alignfast.cli.cmd_train import oracle_settings

    for engine in ("hf", "vllm"):
        config = {"target": {"model": "m", "engine": engine, "system_prompt": "be brief"}}
        assert trainer_config(config).target_system_prompt == "be brief"
    served = {"target": {"model": "m", "engine": "openai", "base_url": "http://127.0.0.1:9/v1", "api": "chat",
                         "system_prompt": "be brief"}}
    assert trainer_config(served).target_system_prompt is None
    engine, _ = build_target_engine(served, device="cpu")
    assert engine.system_prompt == "be brief"
    engine.close()
    assert trainer_config(served, **oracle_settings(served)).target_system_prompt == "be brief"
    assert trainer_config({"target": {"model": "m"}}).target_system_prompt is None


def test_eval_decodes_the_prompter_as_training_sampled_it():
    """`alignfast eval` stops the trained prompter where the trainer's sampler did: trainer.stop_token_id too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignfast.cli.cmd_eval import policy_engine
    from alignfast.rollout import templates
    from alignfast.toy import load_world
    from alignfast.trainer import AlignProConfig

    world = load_world()
    tok = AutoTokenizer.from_pretrained(world.prompter_path)
    model = AutoModelForCausalLM.from_pretrained(world.prompter_path)
    query = templates.user_turn_ids(tok, world.rewrite_template.replace("{prompt}", "sort 3 1 2"))
    free = policy_engine(model, tok, AlignProConfig()).generate([query], max_new_tokens=12)[0][0]
    assert len(free.token_ids) > 1
    stop = free.token_ids[0]
    cfg = AlignProConfig(stop_token_id=stop, max_prompt_length=len(query))
    engine = policy_engine(model, tok, cfg)
    assert stop in engine.eos_token_ids and tok.eos_token_id in engine.eos_token_ids
    assert engine.max_prompt_length == len(query)
    assert engine.generate([query], max_new_tokens=12)[0][0].token_ids == [stop]


def test_the_oracle_is_compared_with_the_system_prompt_it_gets(tmp_path, caplog):
    """The Oracle runs the target here whatever target.engine says, and trains and evaluates after
    target.system_prompt; an openai target's trainer config leaves target_system_prompt unset, so eval warned of a
    difference that was not there, and named a key (--trainer.target_system_prompt) that run files refuse."""
    import argparse
    import json

    from alignfast.cli.build import trainer_config
    from alignfast.cli.eval_checks import settings_against_training

    final = tmp_path / "run" / "oracle" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "alignfast_arm.json").write_text(json.dumps({"arm": "oracle"}))
    trained = trainer_config({}).to_dict() | {"target_system_prompt": "be brief", "response_length": 64}
    (final.parent / "config.json").write_text(json.dumps(trained))
    config = {"target": {"model": "m", "engine": "openai", "base_url": "http://127.0.0.1:9/v1",
                         "system_prompt": "be brief"}}
    args = argparse.Namespace(checkpoint=None, oracle_checkpoint=str(final))
    assert settings_against_training(args, trainer_config(config), config) == {}
    config["target"]["system_prompt"] = "be long"
    differ = settings_against_training(args, trainer_config(config), config)
    assert differ == {"--oracle-checkpoint": {"target_system_prompt": {"trained": "be brief", "evaluated": "be long"}}}
    assert "--target.system_prompt sets it" in caplog.text


def test_a_served_target_gets_its_chat_template_unless_the_run_turns_it_off():
    """target.engine openai without `api`: chat, the input the hf engine gives the same target (its chat template);
    completions when trainer.target_use_chat_template is false. A completions default sent an instruct model the
    bare rewrite when a run moved its target onto a vLLM server."""
    from alignfast.cli.build import build_target_engine

    served = {"model": "m", "engine": "openai", "base_url": "http://127.0.0.1:9/v1"}
    for trainer, api in (({}, "chat"), ({"target_use_chat_template": True}, "chat"),
                         ({"target_use_chat_template": False}, "completions")):
        engine, _ = build_target_engine({"target": dict(served), "trainer": trainer}, device="cpu")
        assert engine.api == api, trainer
        engine.close()
    engine, _ = build_target_engine({"target": {**served, "api": "completions"}}, device="cpu")
    assert engine.api == "completions"  # an explicit setting wins
    engine.close()


def test_an_eval_that_adds_an_arm_is_told_which_arm_the_kept_report_lacks(tmp_path):
    """eval.json beside the checkpoint evaluated no Aligner; an eval adding --aligner-checkpoint is refused (the kept
    report would be overwritten) with 'no --aligner-checkpoint' for the earlier run, not 'none'."""
    import argparse
    import json

    from alignfast.cli.eval_checks import check_default_output

    (tmp_path / "eval.json").write_text(json.dumps({"checkpoint": str(tmp_path / "final"), "aligner_checkpoint": None}))
    args = argparse.Namespace(output_dir=None, checkpoint=str(tmp_path / "final"), oracle_checkpoint=None,
                              aligner_checkpoint=str(tmp_path / "al"), aligner_ppo_checkpoint=None,
                              proxy_checkpoint=None)
    with pytest.raises(CLIError, match=rf"\(there: no --aligner-checkpoint; here: --aligner-checkpoint "
                                       rf"{tmp_path / 'al'}\): pass --output-dir"):
        check_default_output(tmp_path, args)
