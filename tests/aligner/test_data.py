"""Correction rows: field checks, the template, identity rows at the asked ratio, truncation to max_length."""

import pytest

from alignfast.aligner import PAPER_TEMPLATE, REPO_TEMPLATE, AlignerConfig, AlignerTrainer
from alignfast.aligner.data import ONE_TEXT, PIECES_APART, CorrectionEncoder, check_rows, with_identity_rows
from alignfast.ops import AlignfastArgumentError
from tests.aligner.helpers import ROWS, TEMPLATE, bpe_tokenizer, tiny_corrector


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


def test_a_template_with_two_answers_is_refused_and_a_repeated_question_is_rendered(tmp_path):
    """A template with {answer} twice rendered the answer once and the internal marker ('\\x00ALIGNFAST-ANSWER\\x00')
    in place of the second, and the model read that. {answer} is the one span truncation cuts: once only.
    {question} is rendered as it is, so a second one is the question again."""
    _, tok = tiny_corrector(tmp_path)
    twice = "fix {question} | {answer} | {answer} :"
    with pytest.raises(AlignfastArgumentError, match=r"argument 'template' must contain \{answer\} once"):
        CorrectionEncoder(tok, twice)
    with pytest.raises(AlignfastArgumentError, match=r"argument 'template' must contain \{answer\} once"):
        AlignerConfig(template=twice)
    ids = CorrectionEncoder(tok, "fix {question} | {answer} | {question} :").inference_ids("what is the cat", "a dog")
    assert tok.decode(ids) == "fix what is the cat | a dog | what is the cat :"


def test_named_templates_and_bad_settings():
    assert AlignerConfig(template="paper").template_text == PAPER_TEMPLATE
    assert AlignerConfig(template="repo").template_text == REPO_TEMPLATE
    assert PAPER_TEMPLATE.startswith("BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair")
    for kwargs, name in [({"identity_ratio": 1.0}, "identity_ratio"), ({"packing": True}, "packing"),
                         ({"max_length": 1}, "max_length"), ({"learning_rate": 0}, "learning_rate"),
                         ({"lr_scheduler_type": "cosin"}, "lr_scheduler_type"),
                         ({"identity_schedule": "warm-up"}, "identity_schedule")]:
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


def test_a_chat_template_asked_of_a_tokenizer_without_one_is_an_error(tmp_path):
    """use_chat_template=True with a tokenizer that has no chat template trained on plain text while the saved
    aligner_config.json said use_chat_template: true; it is now one line naming the setting."""
    model, tok = tiny_corrector(tmp_path, chat_template=False)
    with pytest.raises(AlignfastArgumentError, match="argument 'use_chat_template' is true and the tokenizer .* has "
                                                     "no chat template"):
        AlignerTrainer(AlignerConfig(output_dir=str(tmp_path / "o"), template=TEMPLATE, use_chat_template=True),
                       model, tok, train_dataset=ROWS)


def test_rows_from_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{**r, "extra": 1} for r in ROWS])
    rows = check_rows(ds)
    assert [r["correction"] for r in rows] == [r["correction"] for r in ROWS] and rows[0]["extra"] == 1


BPE_ROW = {"question": "What is the capital of France?", "answer": "Paris is the capital.",
           "correction": "The capital of France is Paris."}


@pytest.mark.parametrize("template", ["Q: {question} | {answer} ASSISTANT:", REPO_TEMPLATE])
def test_a_bpe_row_is_tokenized_as_one_text(tmp_path, template):
    """The prompt was tokenized in three pieces: with a BPE tokenizer the answer began 'Ġ', 'Paris' where the text
    has 'ĠParis'; and a template ending in a space (`template: repo`) ended the prompt in a lone 'Ġ' and trained the
    correction's first word without its space ('The', not 'ĠThe'; on SmolLM2 the untrained model's correction NLL
    was 71.3 nats instead of 57.2 over three rows). Prompt and correction are now the ids of the text read as one
    piece, the template's trailing space going to the correction's first token, at training and inference alike."""
    tok = bpe_tokenizer(tmp_path / "bpe")
    enc = CorrectionEncoder(tok, template)
    row = enc.encode(BPE_ROW)
    text = template.replace("{question}", BPE_ROW["question"]).replace("{answer}", BPE_ROW["answer"]).rstrip()
    prompt = tok(text)["input_ids"]
    assert row.prompt_ids == prompt and "ĠParis" in tok.convert_ids_to_tokens(prompt)
    assert row.target_ids == tok(text + " " + BPE_ROW["correction"])["input_ids"][len(prompt):] + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(row.target_ids)[0] == "ĠThe"
    assert enc.inference_ids(BPE_ROW["question"], BPE_ROW["answer"]) == row.prompt_ids

    # truncation still cuts the answer's own tokens from its end, and the rest of the prompt stays as it was
    cut = CorrectionEncoder(tok, template, max_length=len(row.prompt_ids) + len(row.target_ids) - 2).encode(BPE_ROW)
    answer = tok.convert_ids_to_tokens(tok(" " + BPE_ROW["answer"])["input_ids"])  # 'ĠParis', 'Ġis', ...
    words = tok.convert_ids_to_tokens(row.prompt_ids)
    start = words.index("ĠParis")
    assert cut.answer_tokens_dropped == 2 and cut.target_ids == row.target_ids
    assert tok.convert_ids_to_tokens(cut.prompt_ids) == words[: start + len(answer) - 2] + words[start + len(answer):]


def test_a_tokenizer_without_offsets_gets_the_parts_tokenized_apart(tmp_path):
    """Only a fast tokenizer gives the character offsets that find the answer's tokens in the one-piece
    tokenization; another one still encodes (parts apart) and still cuts the answer first."""
    _, tok = tiny_corrector(tmp_path)
    row = {"question": "what is the cat", "answer": "a dog is a big dog", "correction": "a cat"}
    fast = CorrectionEncoder(tok, TEMPLATE, max_length=14)
    apart = CorrectionEncoder(tok, TEMPLATE, max_length=14)
    apart._offsets = False  # as for a tokenizer that is not a fast one
    assert apart.encode(row) == fast.encode(row) and fast.encode(row).answer_tokens_dropped == 2


@pytest.mark.parametrize("correction, first", [(" The capital of France is Paris.", ["ĠThe"]),
                                               ("\nThe capital of France is Paris.", ["Ċ", "The"])])
def test_a_correction_opening_with_whitespace_after_a_template_ending_in_a_space(tmp_path, correction, first):
    """`template: repo` ends in a space, which goes to the correction's first token; a correction that opened with
    whitespace of its own then began with a lone 'Ġ' (' The' -> 'Ġ', 'ĠThe'; '\\nThe' -> 'Ġ', 'Ċ', 'The'), a token
    the corrector would learn to write first. Its own whitespace now takes the template's space's place: the ids
    are those of the prompt and the correction read as one text."""
    tok = bpe_tokenizer(tmp_path / "bpe")
    row = {**BPE_ROW, "correction": correction}
    got = CorrectionEncoder(tok, REPO_TEMPLATE).encode(row)
    prompt = REPO_TEMPLATE.replace("{question}", row["question"]).replace("{answer}", row["answer"]).rstrip()
    whole = tok(prompt + correction)["input_ids"]
    assert got.prompt_ids == whole[: len(got.prompt_ids)] == tok(prompt)["input_ids"]
    assert got.target_ids == whole[len(got.prompt_ids):] + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(got.target_ids)[: len(first)] == first


def _pieces_apart(tok, template, row):
    """The ids alignfast gave a row before the one-text encoding: the rendered text before the answer, the answer
    and the text after it tokenized apart, then the correction alone (as it is after a template ending in a space,
    else with one leading space)."""
    before, after = template.replace("{question}", row["question"]).split("{answer}")
    ids = [tok(t, add_special_tokens=i == 0)["input_ids"] for i, t in enumerate((before, row["answer"], after))]
    correction = row["correction"] if after[-1:].isspace() else " " + row["correction"].lstrip()
    return ids[0] + ids[1] + ids[2], tok(correction, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize("template", ["Q: {question} | {answer} ASSISTANT:", REPO_TEMPLATE])
def test_a_corrector_saved_before_the_one_text_encoding_is_fed_the_ids_it_was_trained_on(tmp_path, template, caplog):
    """The one-text encoding changed the prompt ids of every row ('Ġ', 'Paris' became 'ĠParis'; `template: repo`'s
    prompt no longer ends in ':', 'Ġ'), and aligner_config.json did not say which encoding a corrector was trained
    with: a corrector saved before was fed prompts it had never seen. The encoding is now recorded
    (encoding_version), and a folder without it is fed the pieces-apart ids it was trained on, with one warning."""
    import json

    from alignfast.aligner import Corrector
    from tests.trainer.tiny import make_causal_lm

    tok = bpe_tokenizer(tmp_path / "bpe")
    old = CorrectionEncoder(tok, template, encoding_version=PIECES_APART)
    prompt, target = _pieces_apart(tok, template, BPE_ROW)
    assert (old.encode(BPE_ROW).prompt_ids, old.encode(BPE_ROW).target_ids) == (prompt, target)
    assert old.inference_ids(BPE_ROW["question"], BPE_ROW["answer"]) == prompt
    new = CorrectionEncoder(tok, template).encode(BPE_ROW)
    # the two encodings differ here: the answer after the template's space is 'Ġ', 'Pa', 'ris' apart, 'ĠParis' in one
    assert "ĠParis" in tok.convert_ids_to_tokens(new.prompt_ids) and "ĠParis" not in tok.convert_ids_to_tokens(prompt)

    folder = tmp_path / "corrector"
    make_causal_lm(folder, len(tok), hidden=16, layers=1)
    tok.save_pretrained(str(folder))
    settings = {"template": template, "use_chat_template": False, "max_length": 64}
    (folder / "aligner_config.json").write_text(json.dumps(settings))
    with caplog.at_level("WARNING", logger="alignfast.aligner"):
        loaded = [Corrector.from_pretrained(folder) for _ in range(2)]
    assert all(c.encoder.inference_ids(BPE_ROW["question"], BPE_ROW["answer"]) == prompt for c in loaded)
    assert caplog.text.count("has no encoding_version") == 1  # once, not at every load
    assert "the pieces apart (encoding_version 1)" in caplog.text

    (folder / "aligner_config.json").write_text(json.dumps({**settings, "encoding_version": ONE_TEXT}))
    assert Corrector.from_pretrained(folder).encoder.inference_ids(BPE_ROW["question"], BPE_ROW["answer"]) == \
        new.prompt_ids
    (folder / "aligner_config.json").write_text(json.dumps({**settings, "encoding_version": 7}))
    with pytest.raises(AlignfastArgumentError, match="argument 'aligner' .*aligner_config.json has encoding_version 7, "
                                                     "which this alignfast does not know"):
        Corrector.from_pretrained(folder)
    with pytest.raises(AlignfastArgumentError, match="argument 'encoding_version' must be 1 .* or 2 .*, got 0"):
        CorrectionEncoder(tok, template, encoding_version=0)
