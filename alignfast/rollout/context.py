"""What fits in a model's context: checks of a configuration against the models, and counted warnings where data
is cut to fit (the target's own check is align_pro.check_target_room)."""

from __future__ import annotations

import logging

from alignfast.ops._checks import fail

_log = logging.getLogger("alignfast")


def max_positions(model) -> int | None:
    """The model's max_position_embeddings (None: a model without one, or an engine without a local model)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_vocabulary(model, tokenizer, name: str, role: str = "model", setting: str | None = None) -> None:
    """A tokenizer with more tokens than the model's input embeddings (another model's tokenizer) is refused
    up front: its ids would fail inside the first forward pass (an IndexError, or an engine error naming
    'prompts[0]'). setting: the run file's key for it, where `name` is not that key's trainer name."""
    if model is None or tokenizer is None or not hasattr(model, "get_input_embeddings"):
        return
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    try:
        size = len(tokenizer)
    except TypeError:
        return
    if isinstance(rows, int) and size > rows:
        fail(name, f"has {size} tokens but the {role}'s input embeddings hold {rows}: is it another model's "
             "tokenizer? (the model and its tokenizer must share one vocabulary"
             + (f"; {setting} in a run file)" if setting else ")"))


def policy_input_limit(model, config, role: str = "policy") -> int | None:
    """The most tokens the policy's input keeps: max_prompt_length, or what max_position_embeddings leaves beside
    response_length. A response_length or max_prompt_length that cannot fit is an error naming it."""
    max_pos = max_positions(model)
    if max_pos is None:
        return config.max_prompt_length
    if config.response_length >= max_pos:
        fail("response_length", f"({config.response_length}) leaves no room for the {role}'s input: its "
             f"max_position_embeddings is {max_pos}")
    room = max_pos - config.response_length
    if config.max_prompt_length is not None and config.max_prompt_length > room:
        fail("max_prompt_length", f"({config.max_prompt_length}) plus response_length ({config.response_length}) "
             f"exceeds the {role}'s max_position_embeddings ({max_pos})")
    return config.max_prompt_length if config.max_prompt_length is not None else room


class CutCounter:
    """Keeps the last `limit` tokens of each row and warns the first time rows are cut, with their count."""

    def __init__(self, what: str, limit: int | None, why: str):
        self.what, self.limit, self.why = what, limit, why
        self.warned = False

    def __call__(self, rows: list[list[int]]) -> list[list[int]]:
        limit = self.limit
        if limit is None:
            return rows
        cut = sum(len(r) > limit for r in rows)
        if cut and not self.warned:
            self.warned = True
            _log.warning("%d of %d %s are longer than %d tokens and keep their last %d (%s); later cuts are not "
                         "reported", cut, len(rows), self.what, limit, limit, self.why)
        return [r[-limit:] if len(r) > limit else r for r in rows] if cut else rows
