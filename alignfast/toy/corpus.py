"""The supervised corpora the toy world's two models are trained on, as endless seeded samplers.

Target corpus (what the frozen target learned from):
    EXPLICIT_FRACTION of examples: an explicit phrasing of any operation -> that operation's answer;
    the rest: a terse command -> the answer of an operation drawn from the command's `target_habit`
    (mostly a misreading), so the target's greedy answer to most terse commands is wrong.

SFT prompter corpus (what makes ρsft; the source is REWRITE_TEMPLATE around a terse command x):
    COPY_PROB:        x' = x                                  ("mostly copies")
    RIGHT_PROB:       x' = an explicit phrasing of the intended operation
    the rest:         x' = an explicit phrasing of one of the task's wrong_expansions
So ρsft has real mass on the rewrite that helps, and on rewrites that hurt; RL must tell them apart.

Only training lists are used (tasks.is_held_out lists never appear).
"""

from __future__ import annotations

import random

from alignfast.toy.tasks import (
    EXPLICIT_PHRASINGS,
    OPERATIONS,
    TASKS,
    answer_text,
    explicit_prompt,
    sample_numbers,
    terse_prompt,
)
from alignfast.toy.tokenizer import REWRITE_TEMPLATE

EXPLICIT_FRACTION = 0.6
COPY_PROB = 0.6
RIGHT_PROB = 0.15


def _weighted_choice(rng: random.Random, weights: dict[str, float]) -> str:
    names = list(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def _any_phrasing(rng: random.Random, operation: str, numbers: list[int]) -> str:
    return explicit_prompt(operation, numbers, rng.randrange(len(EXPLICIT_PHRASINGS[operation])))


def sample_target_example(rng: random.Random) -> tuple[str, str]:
    """(user message, answer) from the target's corpus."""
    numbers = sample_numbers(rng, held_out=False)
    if rng.random() < EXPLICIT_FRACTION:
        operation = rng.choice(list(OPERATIONS))
        return _any_phrasing(rng, operation, numbers), answer_text(operation, numbers)
    task = rng.choice(TASKS)
    return terse_prompt(task, numbers), answer_text(_weighted_choice(rng, task.target_habit), numbers)


def sample_rewrite(rng: random.Random, task, numbers: list[int]) -> str:
    """One x' from the SFT prompter's corpus for the terse command (task, numbers)."""
    u = rng.random()
    if u < COPY_PROB:
        return terse_prompt(task, numbers)
    if u < COPY_PROB + RIGHT_PROB:
        return _any_phrasing(rng, task.intended, numbers)
    return _any_phrasing(rng, rng.choice(task.wrong_expansions), numbers)


def sample_prompter_example(rng: random.Random) -> tuple[str, str]:
    """(user message = REWRITE_TEMPLATE around x, rewrite x') from the SFT prompter's corpus."""
    task = rng.choice(TASKS)
    numbers = sample_numbers(rng, held_out=False)
    return REWRITE_TEMPLATE.format(prompt=terse_prompt(task, numbers)), sample_rewrite(rng, task, numbers)
