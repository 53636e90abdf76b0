"""The frozen-model generation interface every engine implements (HF, vLLM, OpenAI-compatible)."""

from __future__ import annotations

import abc
import dataclasses
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class Completion:
    """One generated continuation of one prompt.

    text: the decoded continuation (special tokens removed); token_ids: the generated ids (EOS
    included when generation stopped there; empty for engines that return text only);
    finish_reason: 'stop' (EOS or a stop string) or 'length' (max_new_tokens reached);
    num_tokens: tokens generated, for engines that return no token_ids but know the count (OpenAI: the
    response's usage); None means len(token_ids).
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    num_tokens: int | None = None

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids) if self.num_tokens is None else self.num_tokens

    @property
    def truncated(self) -> bool:
        """It stopped at max_new_tokens before EOS: the answer is cut."""
        return self.finish_reason == "length"


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

    @property
    def chat_tokenizer(self):
        """The tokenizer whose chat template formats this engine's input where the caller formats it (a local
        model's), or None: an endpoint is sent text and its server applies the template."""
        return None

    def close(self) -> None:
        """Release resources (threads, servers, GPU memory). Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- argument checks shared by every engine -----------------------------------------------------


@dataclass(frozen=True)
class GenerateArgs:
    """The sampling arguments of one `generate` call, validated."""

    max_new_tokens: int
    temperature: float
    top_p: float
    n: int
    seed: int | None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def requested_n(self) -> int:
        """Samples to ask a backend for per prompt: greedy decoding has one answer (repeat_greedy copies it)."""
        return 1 if self.greedy else self.n

    def base_seed(self) -> int:
        """The call's seed, or (seed=None) one drawn from torch's global generator, so that
        torch.manual_seed makes unseeded calls reproducible too. A greedy call uses no randomness and
        draws nothing (0): an evaluation generate between training steps leaves the global generator,
        and so the training's draws, where they were."""
        if self.seed is not None:
            return self.seed
        if self.greedy:
            return 0
        import torch

        return int(torch.randint(0, 2**62, (1,)).item())


def repeat_greedy(results: list[list[Completion]], args: GenerateArgs) -> list[list[Completion]]:
    """Each prompt's n answers from a backend asked for args.requested_n: a greedy call's one answer, n times
    (vLLM refuses n > 1 at temperature 0, offline and behind `vllm serve`: 'n must be 1 when using greedy
    sampling'); a sampled call's as they are."""
    if args.requested_n == args.n:
        return results
    return [[dataclasses.replace(r[0]) for _ in range(args.n)] for r in results]


def _is_int(x) -> bool:
    # bool is an int subclass but never a token id or a count.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_generate_args(*, max_new_tokens, temperature, top_p, n, seed) -> GenerateArgs:
    """Validates the keyword arguments of `TargetEngine.generate`; errors name the argument."""
    from alignfast.ops._checks import fail, in_range
    from alignfast.ops._checks import temperature as check_temperature

    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        fail("max_new_tokens", f"must be an integer >= 1, got {max_new_tokens!r}")
    temperature = check_temperature("temperature", temperature, zero_is_greedy=True)
    top_p = in_range("top_p", top_p, 0.0, 1.0, lo_open=True)
    if not _is_int(n) or n < 1:
        fail("n", f"must be an integer >= 1, got {n!r}")
    if seed is not None and not _is_int(seed):
        fail("seed", f"must be an integer or None, got {seed!r}")
    return GenerateArgs(int(max_new_tokens), temperature, top_p, int(n), None if seed is None else int(seed))


def check_prompts(prompts) -> list[str | list[int]]:
    """Prompts as a list of text or token-id lists. Token ids may come as lists, tuples, 1-D tensors
    or numpy arrays of integers; they are returned as plain lists of ints."""
    from alignfast.ops._checks import fail

    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
        fail("prompts", f"must be a sequence of prompts (text or token ids), got {type(prompts).__name__}")
    out: list[str | list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(p)
            continue
        if hasattr(p, "tolist"):  # torch tensor / numpy array
            if getattr(p, "ndim", 1) != 1:
                fail(f"prompts[{i}]", f"must be 1-D token ids, got shape {tuple(p.shape)}")
            p = p.tolist()
        if isinstance(p, bytes) or not isinstance(p, Iterable):
            fail(f"prompts[{i}]", f"must be text or a sequence of token ids, got {type(p).__name__}")
        ids = list(p)
        if not all(_is_int(t) for t in ids):
            bad = next(t for t in ids if not _is_int(t))
            fail(f"prompts[{i}]", f"must hold integer token ids only, found {bad!r}")
        out.append([int(t) for t in ids])
    return out


class EngineRequestError(RuntimeError):
    """A request to a generation backend (an HTTP endpoint, a vLLM instance) failed for good: after
    the retries the engine allows, or with an error that retrying cannot fix. The message names the
    prompt index and the last error; the original exception is chained."""


def check_call(prompts, *, max_new_tokens, temperature, top_p, n, seed) -> tuple[GenerateArgs, list[str | list[int]]]:
    """check_generate_args and check_prompts for one `generate` call."""
    args = check_generate_args(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed)
    return args, check_prompts(prompts)
