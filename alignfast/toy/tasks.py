"""The toy world's language: small tasks on short lists of distinct digits, and their true answers.

A user writes a *terse* command ("sort 4 1 3"). Each terse command means one operation (its ground
truth, `TerseTask.intended`), but the frozen target was trained on a corpus in which that terse command
was usually followed by the answer of a *different* operation (`TerseTask.target_habit`): it misreads
under-specified prompts the way real models do. The same operation spelled out *explicitly*
("sort these numbers from smallest to largest : 4 1 3") was always followed by the right answer.

So whether a rewrite helps depends on the task: the prompter must learn, per terse command, which
explicit phrasing makes the target do what the user meant. The reward (alignfast.toy.reward) only
compares the target's answer with `true_answer(original prompt)`; it never looks at the rewrite.

Lists have MIN_LEN..MAX_LEN distinct digits. A fixed fifth of all lists (by a CRC of their text) is held
out: no supervised corpus and no training prompt contains them, only the evaluation prompts do.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MIN_LEN = 3
MAX_LEN = 5
DIGITS = tuple(str(d) for d in range(10))
HELD_OUT_MODULUS = 5  # a list is held out when crc32(text) % HELD_OUT_MODULUS == 0

Operation = Callable[[Sequence[int]], list[int]]

OPERATIONS: dict[str, Operation] = {
    "ascending": lambda xs: sorted(xs),
    "descending": lambda xs: sorted(xs, reverse=True),
    "reverse": lambda xs: list(reversed(xs)),
    "copy": lambda xs: list(xs),
    "largest": lambda xs: [max(xs)],
    "smallest": lambda xs: [min(xs)],
    "first": lambda xs: [xs[0]],
    "last": lambda xs: [xs[-1]],
}

# Explicit phrasings: after any of these the target's corpus always holds the operation's true answer.
EXPLICIT_PHRASINGS: dict[str, tuple[str, ...]] = {
    "ascending": ("sort these numbers from smallest to largest : {numbers}",
                  "arrange the numbers in increasing order : {numbers}"),
    "descending": ("sort these numbers from largest to smallest : {numbers}",
                   "arrange the numbers in decreasing order : {numbers}"),
    "reverse": ("write these numbers in reverse order : {numbers}",
                "write the numbers backwards : {numbers}"),
    "copy": ("write these numbers in the same order : {numbers}",
             "repeat the numbers : {numbers}"),
    "largest": ("what is the largest number : {numbers}",
                "find the biggest number : {numbers}"),
    "smallest": ("what is the smallest number : {numbers}",
                 "find the lowest number : {numbers}"),
    "first": ("what is the first number : {numbers}",
              "find the leading number : {numbers}"),
    "last": ("what is the last number : {numbers}",
             "find the final number : {numbers}"),
}


@dataclass(frozen=True)
class TerseTask:
    """A terse user command.

    word: the command as users type it ("sort"); intended: the operation the user means (the ground
    truth the reward checks); target_habit: how often, in the target's training corpus, the terse
    command was followed by each operation's answer (the target's prior; greedy decoding follows the
    most frequent one); wrong_expansions: operations the SFT prompter sometimes spells out instead of
    the intended one (plausible but wrong readings of the command).
    """

    word: str
    intended: str
    target_habit: dict[str, float]
    wrong_expansions: tuple[str, ...]


TASKS: tuple[TerseTask, ...] = (
    TerseTask("sort", "ascending", {"descending": 0.7, "ascending": 0.3}, ("descending", "reverse")),
    TerseTask("rank", "descending", {"ascending": 0.7, "descending": 0.3}, ("ascending", "reverse")),
    TerseTask("reverse", "reverse", {"reverse": 0.9, "copy": 0.1}, ("copy", "descending")),
    TerseTask("max", "largest", {"first": 0.65, "largest": 0.35}, ("first", "smallest")),
    TerseTask("min", "smallest", {"last": 0.65, "smallest": 0.35}, ("last", "largest")),
)
TASKS_BY_WORD: dict[str, TerseTask] = {task.word: task for task in TASKS}


def format_numbers(numbers: Sequence[int]) -> str:
    return " ".join(str(n) for n in numbers)


def terse_prompt(task: TerseTask, numbers: Sequence[int]) -> str:
    return f"{task.word} {format_numbers(numbers)}"


def explicit_prompt(operation: str, numbers: Sequence[int], variant: int = 0) -> str:
    return EXPLICIT_PHRASINGS[operation][variant].format(numbers=format_numbers(numbers))


def answer_text(operation: str, numbers: Sequence[int]) -> str:
    """The operation's correct answer as the target should write it ("1 3 4")."""
    return format_numbers(OPERATIONS[operation](numbers))


def parse_terse(prompt: str) -> tuple[TerseTask, list[int]]:
    """Inverse of terse_prompt; raises ValueError naming the prompt when it is not a terse command."""
    words = prompt.split()
    if len(words) < 2 or words[0] not in TASKS_BY_WORD or not all(w in DIGITS for w in words[1:]):
        raise ValueError(f"prompt {prompt!r} is not a terse toy command '<{'|'.join(TASKS_BY_WORD)}> <digits>'")
    return TASKS_BY_WORD[words[0]], [int(w) for w in words[1:]]


def true_answer(prompt: str) -> str:
    """The answer the user of a terse prompt means: what the reward compares the target's answer with."""
    task, numbers = parse_terse(prompt)
    return answer_text(task.intended, numbers)


def is_held_out(numbers: Sequence[int]) -> bool:
    return zlib.crc32(format_numbers(numbers).encode()) % HELD_OUT_MODULUS == 0


def sample_numbers(rng: random.Random, *, held_out: bool) -> list[int]:
    """A list of MIN_LEN..MAX_LEN distinct digits from the held-out or the training part of the lists."""
    while True:
        numbers = rng.sample(range(10), rng.randint(MIN_LEN, MAX_LEN))
        if is_held_out(numbers) == held_out:
            return numbers


def make_prompts(count: int, *, seed: int, held_out: bool) -> list[dict]:
    """`count` terse prompts, tasks in rotation, as rows {"prompt", "answer", "task"} (answer: true_answer)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        task = TASKS[i % len(TASKS)]
        numbers = sample_numbers(rng, held_out=held_out)
        prompt = terse_prompt(task, numbers)
        rows.append({"prompt": prompt, "answer": answer_text(task.intended, numbers), "task": task.word})
    return rows


def vocabulary_words() -> list[str]:
    """Every ordinary word the world's text can contain (templates add theirs; see tokenizer.py)."""
    words = set(DIGITS) | {task.word for task in TASKS}
    for phrasings in EXPLICIT_PHRASINGS.values():
        for phrasing in phrasings:
            words.update(w for w in phrasing.split() if w != "{numbers}")
    return sorted(words)
