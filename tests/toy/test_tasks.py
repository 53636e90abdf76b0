"""The task grammar: true answers, the held-out split, lengths that fit the trainer's budgets."""

import random

import pytest

from alignfast.toy import corpus
from alignfast.toy.tasks import (
    EXPLICIT_PHRASINGS,
    MAX_LEN,
    OPERATIONS,
    TASKS,
    answer_text,
    explicit_prompt,
    is_held_out,
    make_prompts,
    parse_terse,
    true_answer,
)
from alignfast.toy.tokenizer import REWRITE_TEMPLATE


@pytest.mark.parametrize("prompt, answer", [
    ("sort 4 1 3", "1 3 4"), ("rank 4 1 3", "4 3 1"), ("reverse 4 1 3 9", "9 3 1 4"),
    ("max 4 1 3 0 2", "4"), ("min 4 1 3", "1"),
])
def test_true_answers(prompt, answer):
    assert true_answer(prompt) == answer


@pytest.mark.parametrize("bad", ["", "sort", "sort 4 x", "please sort 4 1", "4 1 3"])
def test_parse_terse_rejects_non_commands(bad):
    with pytest.raises(ValueError, match="not a terse toy command"):
        parse_terse(bad)


def test_prompt_sets_are_deterministic_and_split_by_list():
    train = make_prompts(500, seed=11, held_out=False)
    held = make_prompts(200, seed=12, held_out=True)
    assert train == make_prompts(500, seed=11, held_out=False)
    assert all(not is_held_out(parse_terse(r["prompt"])[1]) for r in train)
    assert all(is_held_out(parse_terse(r["prompt"])[1]) for r in held)
    assert {r["task"] for r in held} == {t.word for t in TASKS}
    assert all(r["answer"] == true_answer(r["prompt"]) for r in train + held)


def test_about_a_fifth_of_lists_is_held_out():
    rng = random.Random(0)
    lists = [rng.sample(range(10), rng.randint(3, 5)) for _ in range(5000)]
    assert 0.15 < sum(map(is_held_out, lists)) / len(lists) < 0.25


def test_supervised_corpora_never_contain_held_out_lists():
    rng = random.Random(0)
    for _ in range(300):
        message, _ = corpus.sample_target_example(rng)
        assert not is_held_out([int(w) for w in message.split() if w.isdigit()])
        message, rewrite = corpus.sample_prompter_example(rng)
        assert message.startswith(REWRITE_TEMPLATE.split("{prompt}")[0])
        assert not is_held_out([int(w) for w in rewrite.split() if w.isdigit()])


def test_lengths_fit_the_demo_budgets():
    numbers = list(range(MAX_LEN))
    longest_rewrite = max(len(p.split()) for op in EXPLICIT_PHRASINGS
                          for p in (explicit_prompt(op, numbers, v) for v in range(len(EXPLICIT_PHRASINGS[op]))))
    assert longest_rewrite + 1 <= 16  # + EOS: fits response_length
    assert max(len(answer_text(op, numbers).split()) for op in OPERATIONS) + 1 <= 12  # fits target_max_new_tokens


def test_every_task_has_a_misreading_or_is_clear():
    for task in TASKS:
        assert abs(sum(task.target_habit.values()) - 1) < 1e-9
        assert task.intended not in task.wrong_expansions
        assert set(task.wrong_expansions) <= set(OPERATIONS)
