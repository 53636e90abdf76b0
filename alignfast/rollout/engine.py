"""The frozen-model generation interface every engine implements (HF, vLLM, OpenAI-compatible)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Completion:
    """One generated continuation of one prompt.

    text: the decoded continuation (special tokens removed); token_ids: the generated ids (EOS
    included when generation stopped there; empty for engines that return text only);
    finish_reason: 'stop' (EOS or a stop string) or 'length' (max_new_tokens reached).
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"


Prompt = str | Sequence[int]


class TargetEngine(abc.ABC):
    """Generates completions from a frozen model. No gradients, no log-probs: environment dynamics.

    `generate` returns one list per prompt, each with `n` Completions, in the order of `prompts`.
    Prompts are text (the engine applies no chat template: callers format prompts) or token ids.
    temperature == 0 means greedy decoding; `seed` makes sampling reproducible.
    """

    @abc.abstractmethod
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        n: int = 1,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        ...

    def close(self) -> None:
        """Release resources (threads, servers, GPU memory). Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
