"""Rewards r(x, y): reward functions with TRL GRPO's signature, a reward-model wrapper, and their weighted sum.

A reward function is any callable

    f(prompts: list[str], completions: list[str], **columns) -> list[float | None]

returning one score per completion; `columns` holds the dataset's other columns (one list per
column, aligned with prompts) plus what the environment adds (Align-Pro passes `rewrites`), so a
function should accept **kwargs. None means "not applicable to this sample" and is skipped in the
weighted sum (as in GRPO); NaN or inf means something broke, and the trainer stops on it.

In Align-Pro the prompts are the ORIGINAL prompts x and the completions the target's answers y:
the reward judges the answer to the user's question, not to the rewrite.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from alignfast.ops._checks import AlignfastArgumentError, fail
from alignfast.rollout.templates import exchange
from alignfast.rollout.context import CutCounter, check_vocabulary, max_positions

RewardFunc = Callable[..., list]


class RewardModel:
    """A sequence-classification model used as a reward function: score = logits[:, label_index] of the
    exchange (chat template of user=prompt, assistant=completion, or `template` without one).

    model_or_path: an AutoModelForSequenceClassification or a path/name to load one from.
    label_index: which logit is the reward; required when the model has more than one label.
    max_length: keep the last max_length tokens of an exchange.
    """

    def __init__(self, model_or_path, tokenizer=None, *, template: str = "{prompt}\n{completion}",
                 use_chat_template: bool = True, batch_size: int = 32, max_length: int | None = None,
                 label_index: int | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
        if isinstance(model_or_path, (str, os.PathLike)):
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            kwargs = {"dtype": dtype} if dtype is not None else {}
            model = AutoModelForSequenceClassification.from_pretrained(str(model_or_path), **kwargs)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(str(model_or_path))
        else:
            model = model_or_path
        if tokenizer is None:
            fail("reward_tokenizer", "is required when the reward model is passed as a model object")
        if not isinstance(batch_size, int) or batch_size <= 0:
            fail("batch_size", f"must be a positive integer, got {batch_size!r}")
        num_labels = getattr(model.config, "num_labels", 1)
        if label_index is None:
            if num_labels != 1:
                fail("label_index", f"must say which of the reward model's {num_labels} logits is the reward")
            label_index = 0
        if not 0 <= label_index < num_labels:
            fail("label_index", f"({label_index}) must be in [0, {num_labels})")
        if device is not None:
            model = model.to(device)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.use_chat_template = use_chat_template
        self.batch_size = batch_size
        self.max_length = max_length
        self.label_index = label_index
        self.pad_token_id = _classifier_pad_id(model, tokenizer)
        check_vocabulary(model, tokenizer, "reward_tokenizer", "reward model")
        # An exchange beyond the model's positions keeps its end (the answer is what is judged), with a warning.
        self._cut = CutCounter("reward-model exchanges", max_length if max_length is not None else
                               max_positions(model), "the reward model does not see their start")
        name = getattr(model.config, "_name_or_path", "") or "reward_model"
        self.__name__ = name.rstrip("/").split("/")[-1] or "reward_model"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
        if len(prompts) != len(completions):
            fail("completions", f"has {len(completions)} entries but "
                 f"'prompts' has {len(prompts)}")
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            encoded = []
            for p, c in zip(prompts[start:start + self.batch_size], completions[start:start + self.batch_size]):
                text, add_special = exchange(self.tokenizer, p, c, fallback_template=self.template,
                                             use_chat_template=self.use_chat_template)
                ids = list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])
                if not ids:  # an all-pad row: the classifier would pool a pad (NaN under float64 eager attention)
                    fail("reward_template", f"renders exchange {start + len(encoded)} (prompt {p!r}, completion "
                         f"{c!r}) to text of no token ({text!r}): there is nothing for the reward model to score; give "
                         "a template with fixed text, or a tokenizer with a chat template")
                encoded.append(ids)
            encoded = self._cut(encoded)
            input_ids, attention_mask = right_pad(encoded, self.pad_token_id, self.device)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            scores.extend(logits[:, self.label_index].float().tolist())
        return scores


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _classifier_pad_id(model, tokenizer) -> int:
    """The id to pad rows with: the one the classifier pools by. A sequence classifier scores the rightmost
    token that is not config.pad_token_id, so rows must be padded with exactly that id: padded with another
    one (the tokenizer's, when the two disagree), a shorter row would be scored at a pad and its score would
    depend on the rows batched with it. A config without a pad id gets the tokenizer's (set on the model)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        config.pad_token_id = pad = _pad_id(tokenizer)
        return pad
    try:
        vocab = int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        vocab = getattr(config, "vocab_size", None)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0 or (vocab is not None and pad >= vocab):
        fail("reward_model", f"has config.pad_token_id {pad!r}, which is not a token id (vocabulary of {vocab}): "
             "it pools the last token that is not the pad id, so padded rows could not be scored right; set "
             "model.config.pad_token_id to a token id (the tokenizer's pad id)")
    return pad


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def reward_name(func) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


@dataclass
class RewardOutput:
    """total[i] = sum_k weights[k] * per_func[name_k][i] over the functions that scored sample i."""

    total: list[float]
    per_func: dict[str, list[float | None]]


class RewardFunctionError(AlignfastArgumentError):
    """A reward function raised, or returned something other than one number (or None) per completion.
    The message names the function; the original exception is chained."""


def check_weights(weights, name: str = "reward_weights") -> list[float]:
    """Weights as floats; a string, a bool or a non-finite number is an error naming the entry."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (list, tuple)):
        fail(name, f"must be a list of numbers, got {weights!r}")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            fail(name, f"entry {i} must be a finite number, got {w!r}")
        out.append(float(w))
    return out


def _check_accepts(f, name: str, columns: dict) -> None:
    """The columns are passed as keywords: a function without **kwargs that does not name one of them would
    fail with Python's "unexpected keyword argument"; say which columns and what to do instead."""
    try:
        params = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: no signature to check
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    named = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)}
    unknown = [c for c in columns if c not in named]
    if unknown:
        raise RewardFunctionError(f"alignfast: reward function '{name}' does not accept the column(s) "
                                  f"{', '.join(repr(c) for c in unknown)} it is passed: give it a **kwargs "
                                  "parameter (f(prompts, completions, **kwargs))")


def _score(value, name: str, i: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() <= 1:
        value = value.item()
    if isinstance(value, numbers.Real):  # bool, int, float, numpy scalars
        return float(value)
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise RewardFunctionError(f"alignfast: reward function '{name}' returned {type(value).__name__} {shown} for "
                              f"completion {i}; each entry must be a number (or None: not scored)")


def _scores(values, name: str, n: int) -> list[float | None]:
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist() if values.dim() == 1 else values
    elif hasattr(values, "ndim") and hasattr(values, "tolist") and getattr(values, "ndim", 0) == 1:  # numpy
        values = values.tolist()
    if values is None or isinstance(values, (str, bytes, dict, numbers.Number, torch.Tensor)) \
            or not isinstance(values, (list, tuple)):
        shown = repr(values)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise RewardFunctionError(f"alignfast: reward function '{name}' returned {type(values).__name__} {shown}; "
                                  f"it must return a list of {n} scores, one per completion")
    if len(values) != n:
        raise RewardFunctionError(f"alignfast: reward function '{name}' returned {len(values)} scores for "
                                  f"{n} completions")
    return [_score(v, name, i) for i, v in enumerate(values)]


class WeightedRewards:
    """sum_k w_k f_k(prompts, completions, **columns), skipping None entries (GRPO semantics)."""

    def __init__(self, funcs: Sequence[RewardFunc], weights: Sequence[float] | None = None):
        funcs = list(funcs)
        if not funcs:
            raise AlignfastArgumentError("alignfast: no reward: pass 'reward_model' and/or 'reward_funcs'")
        for f in funcs:
            if not callable(f):
                fail("reward_funcs", f"holds {f!r}, which is not callable")
        if weights is None:
            weights = [1.0] * len(funcs)
        weights = check_weights(weights)
        if len(weights) != len(funcs):
            fail("reward_weights", f"has {len(weights)} entries for "
                 f"{len(funcs)} reward functions (reward model first, then reward_funcs)")
        self.funcs = funcs
        self.weights = weights
        self.names = _unique([reward_name(f) for f in funcs])

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> RewardOutput:
        n = len(completions)
        per_func: dict[str, list[float | None]] = {}
        for name, f in zip(self.names, self.funcs):
            if not isinstance(f, RewardModel):
                _check_accepts(f, name, columns)
            try:
                values = f(list(prompts), list(completions), **columns)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - the user's code: re-raised naming the function
                first = str(err).splitlines()[0] if str(err) else ""
                raise RewardFunctionError(f"alignfast: reward function '{name}' raised {type(err).__name__}"
                                          + (f": {first}" if first else "")) from err
            per_func[name] = _scores(values, name, n)
        total = []
        for i in range(n):
            acc, seen = 0.0, False
            for w, name in zip(self.weights, self.names):
                v = per_func[name][i]
                if v is not None:
                    acc += w * v
                    seen = True
            if not seen:
                raise AlignfastArgumentError(f"alignfast: every reward function returned None for completion {i}")
            total.append(acc)
        return RewardOutput(total=total, per_func=per_func)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        out.append(n if k == 0 else f"{n}_{k}")
        seen[n] = k + 1
    return out
