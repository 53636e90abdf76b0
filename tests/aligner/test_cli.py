"""The Aligner from the command line on the toy world: `alignfast aligner train`, `alignfast correct`, the Aligner
arms of `alignfast eval`, the run files in configs/aligner_*.yaml, and one-line errors for bad input."""

import json
from pathlib import Path

import pytest

from alignfast.cli import main
from alignfast.cli.config import load_run_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_train_correct_and_eval_on_the_toy_world(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["aligner", "train", "--config", str(CONFIGS / "aligner_toy.yaml"), "--trainer.output_dir", str(out),
            "--max_steps", "2", "--save_steps", "1", "--data.train.limit", "40", "--data.eval.limit", "8"]
    assert main([*args, "--logging_steps", "1"]) == 0
    # stderr is not a terminal here: a line per logging step, as `alignfast train` prints (it printed none)
    assert "step 2/2" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics[:2]] == [1, 2] and "eval/loss" in metrics[-1]
    assert json.loads((out / "final" / "aligner_config.json").read_text())["template"] == "{question} : {answer}"
    assert main(args[:-4] + ["--max_steps", "3", "--resume"]) == 0  # continues from checkpoint-2
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-2])["step"] == 3

    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "sort 4 8 5 1"}\n{"prompt": "max 1 3 4 2 6"}\n')
    corrected = tmp_path / "c.jsonl"
    assert main(["correct", "--aligner", str(out / "final"), "--upstream", "toy:target", "--data", str(questions),
                 "--output", str(corrected), "--max-new-tokens", "8", "--upstream-max-new-tokens", "8"]) == 0
    rows = [json.loads(x) for x in corrected.read_text().splitlines()]
    assert [r["question"] for r in rows] == ["sort 4 8 5 1", "max 1 3 4 2 6"]
    assert rows[0]["answer"] == "8 5 4 1"  # the frozen toy target's misreading, which the corrector then edits
    assert all(set(r) == {"question", "answer", "correction", "truncated", "answer_tokens_dropped",
                          "answer_truncated"} for r in rows)

    capsys.readouterr()
    assert main(["eval", "--config", str(CONFIGS / "toy.yaml"), "--aligner-checkpoint", str(out / "final"),
                 "--data.eval.limit", "10", "--output-dir", str(tmp_path / "eval")]) == 0
    table = capsys.readouterr().out
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("|")]
    assert names == ["No fine-tuning", "Aligner (SFT)"]
    # an SFT corrector is no PPO corrector: it was scored and labelled "Aligner (PPO corrector)"
    assert main(["eval", "--config", str(CONFIGS / "toy.yaml"), "--aligner-ppo-checkpoint", str(out / "final"),
                 "--data.eval.limit", "10", "--output-dir", str(tmp_path / "eval2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an Aligner corrector trained by SFT" in err[0] and \
        "pass it as --aligner-checkpoint" in err[0], err


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("aligner_*.yaml")), ids=lambda p: p.stem)
def test_aligner_run_files_validate(path):
    from alignfast.cli.cmd_aligner import aligner_config, trainer_fields

    config = load_run_config(path, trainer_fields=trainer_fields())
    cfg = aligner_config(config)
    assert config["aligner"]["model"] and config["data"]["train"]["path"]
    assert "{question}" in cfg.template_text and "{answer}" in cfg.template_text


def test_toy_run_file_trains_as_the_demo_does():
    from alignfast.cli.cmd_aligner import trainer_fields
    from alignfast.toy.corrections import ALIGNER_DEMO_CONFIG

    trainer = load_run_config(CONFIGS / "aligner_toy.yaml", trainer_fields=trainer_fields())["trainer"]
    assert {k: trainer[k] for k in ALIGNER_DEMO_CONFIG} == ALIGNER_DEMO_CONFIG


@pytest.mark.parametrize("rows, extra, message", [
    ('{"question": "q", "answer": "a"}\n', [], "data.train row 0 has no 'correction' field"),
    ('{"question": "q", "answer": "a", "correction": ""}\n', [], "data.train row 0 field 'correction' is empty"),
    ('{"question": "q", "answer": "a", "correction": "c"}\n', ["--trainer.template", "{question} only"],
     "trainer.template must contain {answer}"),
    ('{"question": "q", "answer": "a", "correction": "c"}\n', ["--trainer.learnig_rate", "1"],
     "unknown key 'trainer.learnig_rate'; did you mean 'learning_rate'"),
])
def test_bad_input_is_one_line(tmp_path, capsys, rows, extra, message):
    data = tmp_path / "rows.jsonl"
    data.write_text(rows)
    assert main(["aligner", "train", "--config", str(CONFIGS / "aligner_toy.yaml"), "--data.train.path", str(data),
                 "--data.eval", "null", "--trainer.output_dir", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_correct_closes_its_upstream_client_whatever_happens(tmp_path, capsys):
    """The --upstream-url engine (its event-loop thread and connections) is opened first, to check the endpoint
    before any model loads; a corrector that then failed to load left it running."""
    import threading

    from tests.hardening.test_openai_faults import FaultServer

    def engine_threads():
        return {t for t in threading.enumerate() if t.name == "alignfast-openai" and t.is_alive()}

    before = engine_threads()  # an earlier test's engine, if one is still open, is not this command's
    server = FaultServer()
    try:
        data = tmp_path / "q.jsonl"
        data.write_text('{"question": "sort 4 8 5 1"}\n')
        assert main(["correct", "--aligner", str(tmp_path / "absent"), "--upstream-url", server.base_url,
                     "--upstream-model", "m", "--data", str(data), "--output", str(tmp_path / "o.jsonl")]) == 2
        assert "--aligner" in capsys.readouterr().err
        assert not engine_threads() - before
    finally:
        server.close()


def test_correct_names_the_budget_that_does_not_fit_and_checks_the_endpoint_first(tmp_path, capsys):
    """Both budgets (256 by default) exceed the toy models' 64 positions: the engine's error named its own
    'max_new_tokens' whichever it was; a wrong --upstream-url failed only after the retry budget (33 s)."""
    folder = _tiny_corrector_folder(tmp_path)  # a model of 256 positions; the toy target has 64
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "sort 4 8 5 1"}\n')
    base = ["correct", "--aligner", str(folder), "--data", str(data), "--output", str(tmp_path / "o.jsonl")]
    for extra, message in ((["--upstream", "toy:target"], "--max-new-tokens (256) leaves no room"),
                           (["--upstream", "toy:target", "--max-new-tokens", "8"],
                            "--upstream-max-new-tokens (256) leaves no room"),
                           (["--upstream-url", "http://127.0.0.1:9/v1", "--upstream-model", "m",
                             "--max-new-tokens", "8"], "--upstream-url: OpenAIEngine: cannot reach")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert "is --upstream-url right?" in err[0]  # the hint in correct's own names (it said base_url)


@pytest.mark.parametrize("extra, message", [
    ([], "--upstream-system-prompt needs --upstream or --upstream-url"),
    (["--upstream-url", "http://127.0.0.1:9/v1", "--upstream-model", "m", "--api", "completions"],
     "sent only with --api chat"),
    (["--upstream-url", "http://127.0.0.1:9/v1", "--upstream-model", "m", "--upstream-system-prompt", " "],
     "--upstream-system-prompt must be a non-empty text"),
])
def test_an_upstream_system_prompt_that_would_be_lost_is_one_line(tmp_path, capsys, extra, message):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "sort 4 8 5 1", "answer": "1 4 5 8"}\n')
    assert main(["correct", "--aligner", str(tmp_path), "--data", str(data), "--output", str(tmp_path / "o"),
                 "--upstream-system-prompt", "be brief", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_correct_without_upstream_corrects_the_files_answers_and_names_bad_rows(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "sort 4 8 5 1"}\n')
    assert main(["correct", "--aligner", str(tmp_path), "--data", str(data), "--output", str(tmp_path / "o")]) == 2
    assert "--data row 0 has no 'answer' field" in capsys.readouterr().err


def test_a_folder_that_is_no_corrector_fails_before_any_model_runs(tmp_path, capsys, monkeypatch):
    """An Align-Pro prompter given as --aligner-checkpoint was found out only after the target had answered every
    prompt and the reward had scored them (minutes with a large target)."""
    from alignfast.cli import build
    from alignfast.toy import load_world

    built = []
    monkeypatch.setattr(build, "build_target_engine", lambda *a, **k: built.append(1) or 1 / 0)
    assert main(["eval", "--config", str(CONFIGS / "toy.yaml"), "--aligner-checkpoint", load_world().prompter_path,
                 "--data.eval.limit", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--aligner-checkpoint" in err[0] and "has no aligner_config.json" in err[0], err
    assert not built


def test_columns_named_otherwise_are_mapped_onto_the_aligner_fields(tmp_path, capsys):
    """data.*.columns and prompt_column were accepted for the Aligner's data and then ignored; they now map a set's
    own column names onto question / answer / correction, and a wrong mapping is one line naming the key."""
    from alignfast.cli.aligner_data import load_rows
    from alignfast.cli.errors import CLIError

    data = tmp_path / "rows.jsonl"
    data.write_text('{"query": "q1", "response": "a1", "revision": "c1", "question": "not this one"}\n')
    spec = {"path": str(data), "prompt_column": "query", "columns": {"answer": "response", "correction": "revision"}}
    assert load_rows(spec, what="train") == [{"question": "q1", "answer": "a1", "correction": "c1"}]
    for bad, message in (({"columns": ["query"]}, "data.train.columns must map the Aligner's fields"),
                         ({"columns": {"question": "qry"}}, "data.train.columns names 'qry'"),
                         ({"prompt_column": "query", "columns": {"question": "response"}}, "name different columns"),
                         ({"columns": {"question": "query", "answer": "query"}}, "two fields to the column 'query'")):
        with pytest.raises(CLIError, match=message):
            load_rows({"path": str(data), **bad}, what="train")


def test_a_mapped_column_missing_from_a_later_row_is_one_line(tmp_path):
    from alignfast.cli.aligner_data import load_rows
    from alignfast.cli.errors import CLIError

    data = tmp_path / "rows.jsonl"
    data.write_text('{"q": "q1", "answer": "a1", "correction": "c1"}\n{"answer": "a2", "correction": "c2"}\n')
    with pytest.raises(CLIError, match="names 'q', which row 1 of"):
        load_rows({"path": str(data), "columns": {"question": "q"}}, what="train")


@pytest.mark.parametrize("source", ["file", "toy:corrections"])
def test_a_split_for_a_source_without_splits_is_one_line(tmp_path, capsys, source):
    """data.train.split was accepted for a local file (and a toy: set) and ignored: 'train[:1]' trained on all 4 rows.
    Only a datasets name or folder has splits; elsewhere the key is an error naming it, for the PPO prompts too."""
    from alignfast.cli.data import load_prompts
    from alignfast.cli.errors import CLIError

    data = tmp_path / "rows.jsonl"
    data.write_text('{"question": "q", "answer": "a", "correction": "c", "prompt": "p"}\n' * 4)
    path = str(data) if source == "file" else source
    assert main(["aligner", "train", "--config", str(CONFIGS / "aligner_toy.yaml"), "--data.train.path", path,
                 "--data.train.split", "train[:1]", "--data.eval", "null", "--trainer.output_dir",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.train.split ('train[:1]') applies to a datasets name or folder only" in err[0], err
    with pytest.raises(CLIError, match=r"data.eval.name \('x'\) applies to a datasets name or folder only"):
        load_prompts({"path": str(data) if source == "file" else "toy:eval", "name": "x"}, what="eval")


def _tiny_corrector_folder(tmp_path) -> Path:
    """A folder `alignfast correct --aligner` loads: the tiny corrector, its tokenizer and aligner_config.json."""
    from tests.aligner.helpers import TEMPLATE, tiny_corrector

    tiny_corrector(tmp_path)
    folder = tmp_path / "corrector"
    (folder / "aligner_config.json").write_text(json.dumps({"template": TEMPLATE, "use_chat_template": False,
                                                            "max_length": 64}))
    return folder


def test_correct_flags_cut_corrections_and_keeps_the_other_columns(tmp_path, capsys):
    """`alignfast correct` wrote corrections cut at --max-new-tokens like finished ones, and dropped every column but
    question and answer (an "id" could not be joined back). A cut correction now has "truncated": true and is
    counted in the summary line, and the other columns are carried through."""
    from alignfast.aligner import Corrector

    folder = _tiny_corrector_folder(tmp_path)
    data = tmp_path / "qa.jsonl"
    rows = [{"id": i, "question": q, "answer": a, "source": "x"} for i, (q, a) in
            enumerate([("what is the cat", "a dog"), ("why fish", "no"), ("what", "")])]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["correct", "--aligner", str(folder), "--data", str(data), "--output", str(out),
                 "--max-new-tokens", "1"]) == 0
    written = [json.loads(x) for x in out.read_text().splitlines()]
    want = Corrector.from_pretrained(folder, max_new_tokens=1).generate([r["question"] for r in rows],
                                                                        [r["answer"] for r in rows])
    cut = [c.finish_reason == "length" for c in want]
    assert any(cut)  # one new token: only a first-token EOS finishes
    assert written == [{**r, "correction": c.text, "truncated": c.finish_reason == "length",
                        "answer_tokens_dropped": 0} for r, c in zip(rows, want)]
    assert f", {sum(cut)} cut at --max-new-tokens (1; " in capsys.readouterr().err


def test_correct_says_which_answers_the_corrector_saw_without_their_end(tmp_path, capsys):
    """An answer longer than the corrector's max_length (64 here: 48 tokens for question, template and answer) loses
    its end, as in training; `correct` cut it silently. Each row now says how many tokens were left out, and the
    summary counts the rows."""
    folder = _tiny_corrector_folder(tmp_path)
    data = tmp_path / "qa.jsonl"
    rows = [{"question": "what is the cat", "answer": "a dog " * 60}, {"question": "why fish", "answer": "no"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["correct", "--aligner", str(folder), "--data", str(data), "--output", str(out),
                 "--max-new-tokens", "4"]) == 0
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert written[0]["answer_tokens_dropped"] > 0 and written[1]["answer_tokens_dropped"] == 0
    assert written[0]["answer"] == rows[0]["answer"]  # the row keeps the whole answer
    assert "1 answers longer than the corrector's max_length seen without their end" in capsys.readouterr().err


def test_a_second_round_of_correction_says_whether_its_own_correction_was_cut(tmp_path):
    """Corrections are corrected again by feeding the output back (the Aligner's iterative correction). The output
    row kept the input's "truncated": true from round 1 when round 2's correction was not cut; "truncated" is now
    always written (true or false), saying what this run did."""
    from alignfast.aligner import Corrector

    folder = _tiny_corrector_folder(tmp_path)
    rows = [{"id": i, "question": "what is the cat", "answer": a, "truncated": True} for i, a in enumerate(["is", "a"])]
    data = tmp_path / "round1.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "round2.jsonl"
    assert main(["correct", "--aligner", str(folder), "--data", str(data), "--output", str(out),
                 "--max-new-tokens", "64"]) == 0
    want = Corrector.from_pretrained(folder, max_new_tokens=64).generate([r["question"] for r in rows],
                                                                         [r["answer"] for r in rows])
    assert any(c.finish_reason != "length" for c in want)  # a correction this run finished
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [w["truncated"] for w in written] == [c.finish_reason == "length" for c in want]


def test_a_corrector_saved_with_a_chat_flag_its_tokenizer_could_not_honour_loads_as_plain_text(tmp_path, capsys,
                                                                                                caplog):
    """An earlier trainer, given use_chat_template true and a tokenizer without a chat template, trained on plain text
    and saved use_chat_template: true; `alignfast correct` then refused the corrector ("--aligner alignfast: argument
    'use_chat_template' is true ..."). It now reads plain text, as it was trained, with a warning; training with the
    setting stays an error (test_data). Another bad setting in aligner_config.json is one line naming the folder."""
    from alignfast.aligner import Corrector

    folder = _tiny_corrector_folder(tmp_path)
    settings = json.loads((folder / "aligner_config.json").read_text())
    (folder / "aligner_config.json").write_text(json.dumps({**settings, "use_chat_template": True}))
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "what is the cat", "answer": "a dog"}) + "\n")
    with caplog.at_level("WARNING", logger="alignfast.aligner"):
        assert main(["correct", "--aligner", str(folder), "--data", str(data), "--output", str(tmp_path / "o.jsonl"),
                     "--max-new-tokens", "4"]) == 0
    assert "says use_chat_template: true, and the tokenizer has no chat template" in caplog.text
    loaded = Corrector.from_pretrained(folder, max_new_tokens=4)
    plain = Corrector(loaded.model, loaded.tokenizer, template=settings["template"], max_length=settings["max_length"],
                      max_new_tokens=4, encoding_version=loaded.encoder.encoding_version)
    assert not loaded.encoder.use_chat_template
    assert json.loads((tmp_path / "o.jsonl").read_text())["correction"] == plain.correct(["what is the cat"],
                                                                                         ["a dog"])[0]

    (folder / "aligner_config.json").write_text(json.dumps({**settings, "template": "fix {question} :"}))
    capsys.readouterr()
    assert main(["correct", "--aligner", str(folder), "--data", str(data), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--aligner {folder}: argument 'template' must contain {{answer}}" in err[0], err
    assert "alignfast: argument" not in err[0]
    # alignfast eval's --aligner-checkpoint says it the same way (it printed a stray "alignfast: argument")
    assert main(["eval", "--config", str(CONFIGS / "toy.yaml"), "--aligner-checkpoint", str(folder),
                 "--data.eval.limit", "4", "--output-dir", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--aligner-checkpoint {folder}: argument 'template' must contain" in err[-1], err


@pytest.mark.parametrize("data, extra, message", [
    ('["q1", "q2"]', [], "--data: {data} must hold a list of objects"),
    ('{"prompt": "sort 4 8 5 1"}\n', [], "--data row 0 has no 'answer' field (rows need question, answer); to have "
                                       "an upstream model answer the questions, pass --upstream or --upstream-url"),
    ('{"question": "q", "answer": "a"}\n', ["--upstream-model", "m"],
     "--upstream-model is a setting of --upstream-url, which is not given"),
    ('{"question": "q", "answer": "a"}\n', ["--upstream", "toy:target", "--api", "completions"],
     "--api is a setting of --upstream-url, which is not given (--upstream is a local model"),
])
def test_correct_errors_name_its_own_options(tmp_path, capsys, data, extra, message):
    """Errors named keys `alignfast correct` does not have ("data.correct: ... must hold a list of objects"), a file of
    questions without --upstream did not say that an upstream could answer them, and --upstream-model / --api
    without --upstream-url were silently ignored."""
    path = tmp_path / ("d.json" if data.startswith("[") else "d.jsonl")
    path.write_text(data)
    assert main(["correct", "--aligner", str(tmp_path), "--data", str(path), "--output", str(tmp_path / "o"),
                 *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(data=path) in err[0], err


def test_a_bad_aligner_lora_key_names_the_aligner_section(tmp_path, capsys):
    """--aligner.lora.rr 4 was reported as 'prompter.lora: ...', a section the Aligner's run file does not have."""
    assert main(["aligner", "train", "--config", str(CONFIGS / "aligner_toy.yaml"), "--data.train.limit", "4",
                 "--data.eval", "null", "--trainer.output_dir", str(tmp_path / "o"), "--aligner.lora.rr", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "aligner.lora: " in err[0] and "'rr'" in err[0] and "prompter" not in err[0], err


def test_correct_says_which_upstream_answers_were_cut_at_their_budget(tmp_path, capsys):
    """With --upstream-max-new-tokens too small for the upstream's answers, `correct` corrected the cut answers with
    no trace (the pipeline kept only their text). Each row now has "answer_truncated" and the summary counts them;
    without an upstream the file's answers are not this run's, and no such column is written."""
    folder = _tiny_corrector_folder(tmp_path)
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "sort 4 8 5 1"}\n{"question": "max 1 3 4 2 6"}\n')
    out = tmp_path / "out.jsonl"
    base = ["correct", "--aligner", str(folder), "--upstream", "toy:target", "--data", str(data), "--output", str(out),
            "--max-new-tokens", "4"]
    assert main([*base, "--upstream-max-new-tokens", "2"]) == 0
    written = [json.loads(x) for x in out.read_text().splitlines()]
    # the toy target answers '8 5 4 1' and '1' (see the HF-upstream test): the first is cut at 2 tokens
    assert [(w["answer"], w["answer_truncated"]) for w in written] == [("8 5", True), ("1", False)]
    assert ", 1 upstream answers cut at --upstream-max-new-tokens (2; \"answer_truncated\": true)" in \
        capsys.readouterr().err
    assert main([*base, "--upstream-max-new-tokens", "8"]) == 0
    assert [json.loads(x)["answer_truncated"] for x in out.read_text().splitlines()] == [False, False]
    assert "upstream answers cut" not in capsys.readouterr().err
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "what is the cat", "answer": "a dog"}\n')
    assert main(["correct", "--aligner", str(folder), "--data", str(qa), "--output", str(out),
                 "--max-new-tokens", "4"]) == 0
    assert "answer_truncated" not in json.loads(out.read_text())


def test_eval_counts_and_names_aligner_corrections_cut_at_the_correctors_budget(tmp_path, capsys, caplog):
    """The Aligner (SFT) arm of `alignfast eval` scored corrections cut at its budget (tied to
    trainer.target_max_new_tokens) with no count or warning. The cut ones are now counted in a warning, under the
    table in eval.md, in eval.json ("truncated", "notes") and per row in eval_rollouts.jsonl; --aligner-max-new-tokens
    sets the corrector's own budget."""
    out = tmp_path / "run"
    assert main(["aligner", "train", "--config", str(CONFIGS / "aligner_toy.yaml"), "--trainer.output_dir", str(out),
                 "--max_steps", "1", "--save_strategy", "no", "--data.train.limit", "32", "--data.eval", "null"]) == 0
    base = ["eval", "--config", str(CONFIGS / "toy.yaml"), "--aligner-checkpoint", str(out / "final"),
            "--data.eval.limit", "8", "--output-dir", str(tmp_path / "eval")]
    for extra, setting, budget in ((["--target_max_new_tokens", "3"], "trainer.target_max_new_tokens", 3),
                                   (["--aligner-max-new-tokens", "1"], "--aligner-max-new-tokens", 1)):
        caplog.clear()
        capsys.readouterr()
        assert main([*base, *extra]) == 0
        report = json.loads((tmp_path / "eval" / "eval.json").read_text())
        rollouts = [json.loads(x) for x in (tmp_path / "eval" / "eval_rollouts.jsonl").read_text().splitlines()]
        cut = [r["truncated"] for r in rollouts if r["arm"] == "Aligner (SFT)"]
        assert len(cut) == 8 and sum(cut) > 0 and report["truncated"] == {"Aligner (SFT)": sum(cut)}
        note = (f"Aligner (SFT): {sum(cut)} of 8 corrections stopped at the corrector's max_new_tokens ({budget}, "
                f"{setting}) before EOS and are scored cut")
        assert report["notes"][0].startswith(note)
        assert note in (tmp_path / "eval" / "eval.md").read_text() and note in caplog.text
        assert all("truncated" not in r for r in rollouts if r["arm"] != "Aligner (SFT)")
    for args, message in (([*base, "--aligner-max-new-tokens", "0"], "--aligner-max-new-tokens must be >= 1, got 0"),
                          ([*base, "--aligner-max-new-tokens", "64"], "--aligner-max-new-tokens (64) leaves no room "
                           "for the Aligner (SFT) corrector's input: its max_position_embeddings is 64"),
                          ([*base[:3], "--aligner-ppo-checkpoint", *base[4:], "--aligner-max-new-tokens", "4"],
                           "--aligner-max-new-tokens is the budget of the --aligner-checkpoint corrector")):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], err


PPO_TEMPLATE = "{prompt} : {draft}"


@pytest.fixture(scope="module")
def ppo_corrector(tmp_path_factory):
    """A corrector trained one PPO step in AlignerEnvironment on the toy world (from Python, as the README shows),
    with its own template and a response_length of 3, below the toy run file's target_max_new_tokens (8)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignfast.rollout import HFEngine
    from alignfast.rollout.rewards import WeightedRewards
    from alignfast.toy import load_world
    from alignfast.trainer import AlignerEnvironment, AlignProConfig, PPOTrainer

    out = tmp_path_factory.mktemp("ppo") / "run"
    world = load_world()
    tok = AutoTokenizer.from_pretrained(world.target_path)
    target = HFEngine(AutoModelForCausalLM.from_pretrained(world.target_path).eval().requires_grad_(False), tok)
    env = AlignerEnvironment(target, WeightedRewards(world.reward_funcs), target_tokenizer=tok,
                             correction_template=PPO_TEMPLATE, max_new_tokens=8)
    cfg = AlignProConfig(output_dir=str(out), seed=0, response_length=3, per_device_train_batch_size=8,
                         num_mini_batches=1, max_steps=1, save_steps=1)
    trainer = PPOTrainer(cfg, world.target_path, None, env, train_dataset=world.train_prompts[:8])
    trainer.train()
    trainer.save_model()
    return out


def _eval(tmp_path, name, *extra):
    out = tmp_path / name
    code = main(["eval", "--config", str(CONFIGS / "toy.yaml"), "--data.eval.limit", "8", "--output-dir", str(out),
                 *extra])
    if code:
        return code, None, None
    report = json.loads((out / "eval.json").read_text())
    rows = [json.loads(x) for x in (out / "eval_rollouts.jsonl").read_text().splitlines()]
    return code, report, rows


def _arm(rows, name):
    return [r for r in rows if r["arm"] == name]


def test_eval_scores_the_ppo_corrector_as_it_was_trained(ppo_corrector, tmp_path, caplog):
    """The Aligner (PPO corrector) arm was decoded with trainer.target_max_new_tokens (8) though trained with
    response_length 3, with AlignerEnvironment's default template unless --aligner-ppo-template was given (0.492
    instead of 0.965 on the review's corrector, silently), its cut corrections were not reported, and its rows in
    eval_rollouts.jsonl held no draft. Its template and budget now come from the checkpoint's record; cuts are
    reported as the SFT arm's are; each row has the draft it corrected (the No fine-tuning answer)."""
    final = str(ppo_corrector / "final")
    code, report, rows = _eval(tmp_path, "a", "--aligner-ppo-checkpoint", final)
    assert code == 0 and report["settings_differ_from_training"] == {}
    ppo = _arm(rows, "Aligner (PPO corrector)")
    assert [r["draft"] for r in ppo] == [r["answer"] for r in _arm(rows, "No fine-tuning")]
    cut = [r["truncated"] for r in ppo]
    assert len(cut) == 8 and sum(cut) > 0 and report["truncated"] == {"Aligner (PPO corrector)": sum(cut)}
    assert all(len(r["answer"].split()) <= 3 for r in ppo)  # the toy tokenizer: a number is a token
    note = (f"Aligner (PPO corrector): {sum(cut)} of 8 corrections stopped at the corrector's max_new_tokens (3, the "
            "response_length it was trained with)")
    assert report["notes"][0].startswith(note) and note in caplog.text
    # the recorded template is the one used: giving it changes nothing
    code, _, same = _eval(tmp_path, "b", "--aligner-ppo-checkpoint", final, "--aligner-ppo-template", PPO_TEMPLATE)
    assert code == 0 and [r["answer"] for r in _arm(same, "Aligner (PPO corrector)")] == [r["answer"] for r in ppo]

    caplog.clear()  # other settings than the training's: a warning each, and eval.json says which
    code, report, _ = _eval(tmp_path, "c", "--aligner-ppo-checkpoint", final, "--aligner-ppo-max-new-tokens", "2",
                            "--aligner-ppo-template", "{draft} ? {prompt}", "--target_max_new_tokens", "6")
    assert code == 0 and report["settings_differ_from_training"] == {"--aligner-ppo-checkpoint": {
        "aligner_ppo_max_new_tokens": {"trained": 3, "evaluated": 2},
        "aligner_ppo_template": {"trained": PPO_TEMPLATE, "evaluated": "{draft} ? {prompt}"},
        "target_max_new_tokens": {"trained": 8, "evaluated": 6}}}
    assert "sets it" in caplog.text and "--aligner-ppo-max-new-tokens" in caplog.text


def test_both_corrector_arms_correct_the_same_drafts(ppo_corrector, tmp_path):
    """The PPO arm drew its own drafts with top_p=1.0 whatever trainer.target_top_p said (29 of 40 equal to the
    SFT arm's on the review's run); both now correct the No fine-tuning answers."""
    code, report, rows = _eval(tmp_path, "a", "--aligner-ppo-checkpoint", str(ppo_corrector / "final"),
                               "--aligner-checkpoint", str(_tiny_corrector_folder(tmp_path)),
                               "--aligner-max-new-tokens", "4", "--target_temperature", "1.0", "--target_top_p", "0.5")
    assert code == 0
    baseline = [r["answer"] for r in _arm(rows, "No fine-tuning")]
    assert [r["draft"] for r in _arm(rows, "Aligner (PPO corrector)")] == baseline
    assert [r["draft"] for r in _arm(rows, "Aligner (SFT)")] == baseline
    assert report["settings_differ_from_training"]["--aligner-ppo-checkpoint"] == {
        "target_temperature": {"trained": 0.0, "evaluated": 1.0}, "target_top_p": {"trained": 1.0, "evaluated": 0.5}}


def test_aligner_ppo_checkpoint_takes_ppo_correctors_only(ppo_corrector, tmp_path, capsys, caplog):
    """--aligner-ppo-checkpoint accepted any model; a PPO corrector given as --checkpoint was refused without
    naming the flag it belongs to. A folder saved before the environment was recorded is still evaluated, with
    AlignerEnvironment's default template and a warning."""
    import shutil

    final = ppo_corrector / "final"
    for extra, message in ((["--checkpoint", str(final)], "was trained as the ppo arm, not align_pro: pass it as "
                                                           "--aligner-ppo-checkpoint"),
                           (["--aligner-ppo-checkpoint", str(_tiny_corrector_folder(tmp_path))],
                            "is an Aligner corrector trained by SFT (it holds aligner_config.json): pass it as "
                            "--aligner-checkpoint")):
        capsys.readouterr()
        assert _eval(tmp_path, "x", *extra)[0] == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    for extra, message in ((["--aligner-ppo-checkpoint", str(final), "--aligner-ppo-max-new-tokens", "0"],
                            "--aligner-ppo-max-new-tokens must be >= 1, got 0"),
                           (["--aligner-ppo-checkpoint", str(final), "--aligner-ppo-max-new-tokens", "64"],
                            "--aligner-ppo-max-new-tokens (64) leaves no room for the Aligner (PPO) corrector's input"),
                           (["--aligner-checkpoint", str(_tiny_corrector_folder(tmp_path)),
                             "--aligner-ppo-max-new-tokens", "4"],
                            "--aligner-ppo-max-new-tokens is the budget of the --aligner-ppo-checkpoint corrector")):
        capsys.readouterr()
        assert _eval(tmp_path, "x", *extra)[0] == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], err
    other = tmp_path / "other"
    shutil.copytree(final, other)
    (other / "alignfast_arm.json").write_text(json.dumps({"arm": "ppo", "environment": "MyEnvironment"}))
    assert _eval(tmp_path, "x", "--aligner-ppo-checkpoint", str(other))[0] == 2
    assert "was trained by PPO in MyEnvironment, not AlignerEnvironment" in capsys.readouterr().err
    (other / "alignfast_arm.json").write_text(json.dumps({"arm": "ppo"}))  # as saved before the record
    caplog.clear()
    code, report, rows = _eval(tmp_path, "old", "--aligner-ppo-checkpoint", str(other))
    assert code == 0 and report["settings_differ_from_training"] == {}
    assert "records no correction_template" in caplog.text
