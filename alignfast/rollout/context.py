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
    'prompts[0]'). One that fits but looks like another model's is a warning naming the setting (it runs, on ids
    that mean other words to the model): special token ids (EOS, BOS, pad) other than the model config's, where both
    are set, or many more embedding rows than tokens (see _unused_rows). setting: the run file's key for it, where
    `name` is not that key's trainer name."""
    if model is None or tokenizer is None or not hasattr(model, "get_input_embeddings"):
        return
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    try:
        size = len(tokenizer)
    except TypeError:
        return
    where = f"; {setting} in a run file" if setting else ""
    if isinstance(rows, int) and size > rows:
        fail(name, f"has {size} tokens but the {role}'s input embeddings hold {rows}: is it another model's "
             f"tokenizer? (the model and its tokenizer must share one vocabulary{where})")
    problems = _special_id_mismatches(model, tokenizer)
    if isinstance(rows, int) and _unused_rows(size, rows):
        problems.append(f"it has {size} tokens for the {role}'s {rows} embedding rows")
    if problems:
        _log.warning("argument '%s' may be another model's tokenizer, not the %s's (%s): the %s would read its ids "
                     "as other tokens; give the %s's own tokenizer%s", name, role, "; ".join(problems), role, role,
                     f" ({setting} in a run file)" if setting else "")


def _unused_rows(tokens: int, rows: int) -> bool:
    """More embedding rows than tokens by more than padding explains. Real models pad their embeddings to a
    round size, often far beyond a multiple of 64 or 128 (figures from their published configs and tokenizers):
    Qwen2.5 151665 tokens for 151936 rows (271 unused), Qwen2.5-7B 399, Phi-1.5/Phi-2 50295 for 51200 (905),
    DeepSeek-V2 100015 for 102400 (2385), Pythia-12b 411;
    Llama 3 has 128256 of each (its 256 reserved tokens are in the tokenizer). So a fixed row count such as 1024
    would fire on real models, and a fraction alone would fire on a tiny model padded to 64 (51 tokens, 64 rows).
    Both must hold: more than 128 rows unused (the largest usual multiple) and more than a tenth of them (the
    real models above leave under 3%). The toy target's 51 tokens for a 220-row model leave 169 rows, 77%."""
    unused = rows - tokens
    return unused > 128 and unused > rows / 10


def _special_id_mismatches(model, tokenizer) -> list[str]:
    """EOS, BOS and pad ids where the tokenizer and the model config both set one and they differ (a config may
    list several EOS ids: the tokenizer's must be one of them). A pad that is the tokenizer's own EOS is not
    compared: `tokenizer.pad_token = tokenizer.eos_token` is the usual fix for a tokenizer without one, and says
    nothing about whose vocabulary it is (alignfast pads by the model's pad id where it matters, as RewardModel)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    out = []
    for kind in ("eos", "bos", "pad"):
        mine = getattr(tokenizer, f"{kind}_token_id", None)
        theirs = getattr(config, f"{kind}_token_id", None)
        if not isinstance(mine, int) or theirs is None:
            continue
        if kind == "pad" and mine == getattr(tokenizer, "eos_token_id", None):
            continue
        allowed = set(theirs) if isinstance(theirs, (list, tuple)) else {theirs}
        if not all(isinstance(t, int) for t in allowed) or mine in allowed:
            continue
        out.append(f"its {kind} token id is {mine}, the model config's {theirs}")
    return out


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
