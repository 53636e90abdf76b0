"""The KV-cache argument of a transformers model under its current name.

transformers 5 renamed `past_key_values` to `cache` (the forward's keyword and the output's field) and logs a
deprecation warning on every use of the old name; transformers 4 knows only the old one (and would silently
ignore `cache=`, landing in **kwargs). So the name is read from the forward's signature, once per model.
"""

from __future__ import annotations

import inspect


def forward_parameters(model) -> dict[str, inspect.Parameter] | None:
    """The parameters of the forward that does the work: a PEFT wrapper's forward takes **kwargs and passes
    them to its base model, so the base model's signature is the one that says what a call may pass.
    None when the signature cannot be read."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return dict(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return None


def cache_keyword(model) -> str:
    """'cache' when model.forward takes it (transformers >= 5), else 'past_key_values'."""
    params = forward_parameters(model)
    return "cache" if params is not None and "cache" in params else "past_key_values"


def output_cache(out):
    """The cache a forward returned, read under the new name first (no deprecation warning)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
