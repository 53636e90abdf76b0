"""The reward on hand-written cases: r(x, y) = right words in the right place / max(|y|, |answer|)."""

import pytest

from alignfast.toy.reward import answer_accuracy, position_accuracy


@pytest.mark.parametrize("completion, expected", [
    ("1 3 4", 1.0),            # exact
    ("1 4 3", 1 / 3),          # one of three positions right
    ("4 3 1", 1 / 3),          # the descending misreading of "sort" keeps only the middle word
    ("3 4 1", 0.0),            # no word in its place
    ("1 3", 2 / 3),            # too short: the missing word costs
    ("1 3 4 5", 3 / 4),        # too long: the extra word costs
    ("", 0.0),                 # empty
    ("sort the <unk> :", 0.0),  # garbage
    ("  1   3 4 ", 1.0),       # whitespace does not matter
])
def test_position_accuracy_hand_written(completion, expected):
    assert position_accuracy(completion, "1 3 4") == pytest.approx(expected)


def test_answer_column_is_used():
    prompts = ["sort 4 1 3", "max 4 1 3"]
    assert answer_accuracy(prompts, ["1 3 4", "4"], answer=["1 3 4", "4"]) == [1.0, 1.0]
    # The column is the truth it is given, whatever the prompt says.
    assert answer_accuracy(prompts, ["1 3 4", "4"], answer=["4 3 1", "1"]) == [pytest.approx(1 / 3), 0.0]


def test_answer_derived_from_original_prompt_without_column():
    prompts = ["sort 4 1 3", "rank 4 1 3", "reverse 4 1 3", "max 4 1 3", "min 4 1 3"]
    rightly = ["1 3 4", "4 3 1", "3 1 4", "4", "1"]
    assert answer_accuracy(prompts, rightly) == [1.0] * 5
    # The target's typical misreadings of terse commands score low.
    misread = ["4 3 1", "1 3 4", "4 1 3", "4 1 3", "3"]
    scores = answer_accuracy(prompts, misread)
    assert scores[:2] == [pytest.approx(1 / 3)] * 2 and scores[2] == pytest.approx(1 / 3)
    assert scores[3] == pytest.approx(1 / 3)  # "4 1 3" for "max": right first word, two extra words
    assert scores[4] == 0.0


def test_conversational_completions_and_extra_columns():
    completion = [{"role": "assistant", "content": "1 3 4"}]
    assert answer_accuracy(["sort 4 1 3"], [completion], task=["sort"], rewrite=["anything"]) == [1.0]


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="prompts and completions"):
        answer_accuracy(["sort 4 1 3"], ["1 3 4", "1"])
    with pytest.raises(ValueError, match="answer"):
        answer_accuracy(["sort 4 1 3"], ["1 3 4"], answer=[])
    with pytest.raises(ValueError, match="not a terse toy command"):
        answer_accuracy(["please sort"], ["1 3 4"])
    with pytest.raises(TypeError, match="completions"):
        answer_accuracy(["sort 4 1 3"], [3])
