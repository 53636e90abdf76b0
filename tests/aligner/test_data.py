"""Correction rows: field checks, the template, identity rows at the asked ratio, truncation to max_length."""

import pytest

from alignfast.aligner import PAPER_TEMPLATE, REPO_TEMPLATE, AlignerConfig
from alignfast.aligner.data import CorrectionEncoder, check_rows, with_identity_rows
from alignfast.ops import AlignfastArgumentError
from tests.aligner.helpers import ROWS, TEMPLATE, tiny_corrector


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.9])
def test_identity_rows_appear_at_the_asked_ratio(ratio):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "correction": f"c{i}"} for i in range(200)]
    mixed = with_identity_rows(rows, ratio, seed=0)
    identity = [r for r in mixed if r.get("identity")]
    assert abs(len(identity) / len(mixed) - ratio) < 1 / len(mixed)
    assert all(r["correction"] == r["answer"] for r in identity)
    assert mixed[:200] == rows  # the real rows are kept, in order
    assert len({r["question"] for r in identity}) == len(identity) or ratio >= 0.5  # no repeats while any is unused
    assert with_identity_rows(rows, ratio, seed=0) == mixed  # seeded
    assert with_identity_rows(rows, 0.0, seed=0) == rows


@pytest.mark.parametrize("row, message", [
    ({"answer": "a", "correction": "b"}, "row 0 has no 'question' field"),
    ({"question": "q", "correction": "b"}, "row 0 has no 'answer' field"),
    ({"question": "q", "answer": "a"}, "row 0 has no 'correction' field"),
    ({"question": "q", "answer": "a", "correction": "  "}, "row 0 field 'correction' is empty"),
    ({"question": "", "answer": "a", "correction": "b"}, "row 0 field 'question' is empty"),
    ({"question": "q", "answer": 3, "correction": "b"}, "row 0 field 'answer' must be text"),
])
def test_bad_rows_name_the_field(row, message):
    with pytest.raises(AlignfastArgumentError, match=f"argument 'train_dataset' {message}"):
        check_rows([row])


def test_empty_or_wrong_datasets():
    with pytest.raises(AlignfastArgumentError, match="'train_dataset' is empty"):
        check_rows([])
    with pytest.raises(AlignfastArgumentError, match="'train_dataset' must be a list of rows"):
        check_rows("rows.jsonl")


@pytest.mark.parametrize("template, missing", [("{question} only", "{answer}"), ("{answer} only", "{question}")])
def test_template_without_a_field_is_an_error(template, missing):
    with pytest.raises(AlignfastArgumentError, match=f"argument 'template' must contain {missing}"):
        AlignerConfig(template=template)


def test_named_templates_and_bad_settings():
    assert AlignerConfig(template="paper").template_text == PAPER_TEMPLATE
    assert AlignerConfig(template="repo").template_text == REPO_TEMPLATE
    assert PAPER_TEMPLATE.startswith("BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair")
    for kwargs, name in [({"identity_ratio": 1.0}, "identity_ratio"), ({"packing": True}, "packing"),
                         ({"max_length": 1}, "max_length"), ({"learning_rate": 0}, "learning_rate"),
                         ({"lr_scheduler_type": "cosin"}, "lr_scheduler_type")]:
        with pytest.raises(AlignfastArgumentError, match=f"argument '{name}'"):
            AlignerConfig(**kwargs)
    with pytest.raises(AlignfastArgumentError, match="unknown config key 'learnig_rate'; did you mean 'learning_rate'"):
        AlignerConfig.from_dict({"learnig_rate": 1e-5})


def test_too_long_rows_lose_the_end_of_the_answer_first(tmp_path):
    _, tok = tiny_corrector(tmp_path)
    row = {"question": "what is the cat", "answer": "a dog is a big dog", "correction": "a cat"}
    full = CorrectionEncoder(tok, TEMPLATE).encode(row)
    assert len(full.prompt_ids) == 1 + 4 + 1 + 6 + 1 and len(full.target_ids) == 3
    enc = CorrectionEncoder(tok, TEMPLATE, max_length=len(full.prompt_ids) + 3 - 2)
    cut = enc.encode(row)
    words = tok.convert_ids_to_tokens(cut.prompt_ids)
    assert words == "fix what is the cat | a dog is a :".split()  # the answer's last two words went
    assert tok.convert_ids_to_tokens(cut.target_ids) == ["a", "cat", tok.eos_token]
    assert cut.answer_tokens_dropped == 2 and cut.correction_tokens_dropped == 0


def test_correction_keeps_its_start_when_even_the_bare_prompt_is_too_long(tmp_path):
    _, tok = tiny_corrector(tmp_path)
    row = {"question": "what is the cat", "answer": "a dog", "correction": "yes the fish is big"}
    bare = 1 + 4 + 1 + 1  # fix <question> | :
    cut = CorrectionEncoder(tok, TEMPLATE, max_length=bare + 2).encode(row)
    assert tok.convert_ids_to_tokens(cut.prompt_ids) == "fix what is the cat | :".split()
    assert tok.convert_ids_to_tokens(cut.target_ids) == ["yes", "the"]  # the start, no EOS
    assert cut.answer_tokens_dropped == 2 and cut.correction_tokens_dropped == 4
    with pytest.raises(AlignfastArgumentError, match=r"argument 'max_length' \(7\) leaves no room for the correction "
                                                     "of row 5"):
        CorrectionEncoder(tok, TEMPLATE, max_length=bare).encode(row, index=5)


def test_chat_template_is_applied_only_when_asked(tmp_path):
    _, tok = tiny_corrector(tmp_path, chat_template=True)
    row = ROWS[0]
    plain = CorrectionEncoder(tok, TEMPLATE).encode(row)
    chat = CorrectionEncoder(tok, TEMPLATE, use_chat_template=True).encode(row)
    assert "<user>" not in tok.convert_ids_to_tokens(plain.prompt_ids)
    assert tok.convert_ids_to_tokens(chat.prompt_ids)[0] == "<user>"
    assert tok.convert_ids_to_tokens(chat.prompt_ids)[-1] == "<assistant>"
    assert chat.target_ids == plain.target_ids


def test_rows_from_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{**r, "extra": 1} for r in ROWS])
    rows = check_rows(ds)
    assert [r["correction"] for r in rows] == [r["correction"] for r in ROWS] and rows[0]["extra"] == 1
