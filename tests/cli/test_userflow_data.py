"""Data files as users write them: a BOM, a `prompt` column beside prompt_column, a saved Dataset folder."""

import json
import logging

import pytest

from alignfast.cli.data import load_prompts
from alignfast.cli.errors import CLIError


def test_a_prompt_column_in_the_file_does_not_override_prompt_column(tmp_path, caplog):
    f = tmp_path / "both.jsonl"
    f.write_text("".join(json.dumps({"question": q, "prompt": "IGNORE", "k": "x"}) + "\n" for q in ("q1", "q2")))
    with caplog.at_level(logging.WARNING, logger="alignfast"):
        rows = load_prompts({"path": str(f), "prompt_column": "question"}, what="train")
    assert [r["prompt"] for r in rows] == ["q1", "q2"] and rows[0]["k"] == "x"
    assert "'prompt' column" in caplog.text and "data.train.prompt_column 'question'" in caplog.text


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path, suffix):
    f = tmp_path / f"bom{suffix}"
    text = {".csv": "prompt,keyword\nhello,x\n", ".jsonl": '{"prompt": "hello", "keyword": "x"}\n',
            ".json": '[{"prompt": "hello", "keyword": "x"}]'}[suffix]
    f.write_text(text, encoding="utf-8-sig")
    assert load_prompts({"path": str(f)}, what="train") == [{"keyword": "x", "prompt": "hello"}]


def test_a_dataset_saved_to_disk_is_read_like_a_saved_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"p{i}", "keyword": "k"} for i in range(3)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    for folder in ("ds", "dd"):
        got = load_prompts({"path": str(tmp_path / folder), "limit": 2}, what="train")
        assert [r["prompt"] for r in got] == ["p0", "p1"]
    with pytest.raises(CLIError, match=r"data.eval.split \('test'\) does not apply"):
        load_prompts({"path": str(tmp_path / "ds"), "split": "test"}, what="eval")


def test_settings_of_a_data_split_given_as_a_path_apply(tmp_path):
    from alignfast.cli.config import load_run_config

    f = tmp_path / "run.yaml"
    f.write_text("data:\n  eval: e.jsonl\n")
    config = load_run_config(str(f), ["--data.train", "t.jsonl", "--data.train.limit", "2",
                                      "--data.eval.prompt_column", "question"])
    assert config["data"]["train"] == {"path": "t.jsonl", "limit": 2}
    assert config["data"]["eval"] == {"path": "e.jsonl", "prompt_column": "question"}


def test_correct_refuses_an_upstream_that_would_replace_the_files_answers(tmp_path, capsys):
    from alignfast.cli import main

    f = tmp_path / "qa.jsonl"
    f.write_text('{"question": "q", "answer": "mine"}\n')
    rc = main(["correct", "--aligner", str(tmp_path / "none"), "--upstream", "toy:target", "--data", str(f),
               "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "has an 'answer' column, which --upstream would replace" in err
    assert len(err.strip().splitlines()) == 1


def test_the_oracles_answer_budget_is_named_as_the_run_file_sets_it(tmp_path, capsys):
    """train --oracle gives the policy the target's answer budget (trainer.target_max_new_tokens) as its
    response_length: a budget that leaves no room names the key the user set, not trainer.response_length; the
    next command in the same process names its own fields again."""
    from pathlib import Path

    from alignfast.cli import main

    config = str(Path(__file__).resolve().parents[2] / "configs" / "toy.yaml")
    assert main(["train", "--config", config, "--oracle", "--trainer.target_max_new_tokens", "5000",
                 "--trainer.output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alignfast train: error: trainer.target_max_new_tokens (5000) leaves no room"), err
    assert main(["train", "--config", config, "--trainer.response_length", "5000",
                 "--trainer.output_dir", str(tmp_path / "a")]) == 2
    assert "error: trainer.response_length (5000) leaves no room" in capsys.readouterr().err


def test_a_template_field_that_is_not_one_is_said(caplog):
    """render() replaces only a template's own fields (JSON examples and code in it stay as they are), so a typo
    such as {promt}, or a data column, reached the model as text without a word."""
    from alignfast.aligner import AlignerConfig
    from alignfast.trainer import AlignProConfig

    with caplog.at_level(logging.WARNING, logger="alignfast"):
        AlignProConfig(rewrite_template='Rewrite {promt} as JSON {"text": ...}: {prompt}',
                       target_prompt_template="{rewrite} {keyword}")
        AlignerConfig(template="Q: {question} A: {answer} {hint}")
    said = [r.getMessage() for r in caplog.records]
    assert "rewrite_template: {promt} is not a field and will reach the model as text (its fields: {prompt})" in said
    assert any(m.startswith("target_prompt_template: {keyword} is not a field") for m in said)
    assert any(m.startswith("template: {hint} is not a field") for m in said)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignfast"):
        AlignProConfig()
        AlignerConfig()
    assert not caplog.records  # the defaults use their fields only
