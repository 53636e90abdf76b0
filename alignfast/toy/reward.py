"""The toy world's reward: how well the target's answer matches what the ORIGINAL prompt asked for.

    r(x, y) = #{i : y_i == a_i} / max(|y|, |a|)        a = true_answer(x), both split on whitespace

Position-wise accuracy with a length term: each right word in the right place earns 1/max(|y|, |a|),
so missing, extra and wrong words all cost. r = 1 exactly when y == a; r = 0 for an empty answer.
The rewrite x' never enters: a rewrite is rewarded only through the answer it makes the target give.
"""

from __future__ import annotations

from collections.abc import Sequence

from alignfast.toy.tasks import true_answer


def position_accuracy(answer: str, reference: str) -> float:
    """Fraction of reference positions answered right, over the longer of the two word sequences."""
    got, want = answer.split(), reference.split()
    longest = max(len(got), len(want))
    if longest == 0:
        return 1.0
    return sum(g == w for g, w in zip(got, want)) / longest


def _text(completion) -> str:
    """A completion as text: a string, or a conversation (list of {"role", "content"}) whose last turn counts."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"completions: expected str or a list of chat messages, got {type(completion).__name__}")


def answer_accuracy(prompts: Sequence, completions: Sequence, answer: Sequence[str] | None = None,
                    **columns) -> list[float]:
    """GRPO-style reward f(prompts, completions, **columns) -> list[float]: position_accuracy of each
    completion against its prompt's true answer. `answer` (a dataset column) gives the true answers;
    without it they are derived from the original terse prompts. Extra columns are ignored."""
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions: lengths differ ({len(prompts)} vs {len(completions)})")
    if answer is None:
        answer = [true_answer(_text(p)) for p in prompts]
    elif len(answer) != len(completions):
        raise ValueError(f"answer: {len(answer)} entries for {len(completions)} completions")
    return [position_accuracy(_text(c), a) for c, a in zip(completions, answer)]
