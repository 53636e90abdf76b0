"""The engine's checks of what an Environment returns (environments.Environment states the contract).

A custom environment that returns one request or score too few, a None, a string or a bare list is otherwise
trained on silently (zip truncates), or fails deep in the engine under its internal names. Each check runs right
after the environment's call and raises one line naming the environment class, its method and the field. They
look at lengths and types only (no per-token work): a few microseconds per episode.
"""

from __future__ import annotations

import numbers

from alignfast.ops._checks import AlignfastArgumentError


def _raise(env, method: str, message: str):
    raise AlignfastArgumentError(f"alignfast: {type(env).__name__}.{method} {message}")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple))


def check_requests(env, requests, columns: dict, n: int) -> list[str]:
    """policy_requests' result: a list of n str, in the prompts' order; the columns it may add: n values each."""
    if not _is_list(requests):
        _raise(env, "policy_requests", f"must return a list of {n} str (one per prompt), got "
               f"{type(requests).__name__}")
    if len(requests) != n:
        _raise(env, "policy_requests", f"returned {len(requests)} requests for {n} prompts")
    for i, r in enumerate(requests):
        if not isinstance(r, str):
            _raise(env, "policy_requests", f"returned requests[{i}] {_shown(r)}: it must be a str, got "
                   f"{type(r).__name__}")
    for name, values in columns.items():
        if not _is_list(values) or len(values) != n:
            got = f"{len(values)} values" if _is_list(values) else type(values).__name__
            _raise(env, "policy_requests", f"left columns['{name}'] with {got} for {n} prompts: a column holds "
                   "one value per prompt (a list)")
    return list(requests)


def check_env_output(env, out, prompts, *, first_episode: int = 0) -> None:
    """step's result: an EnvOutput with one real score per episode (None is an unscored episode: an error naming
    the episode and the reward functions that left it unscored), one list of str answers per episode, per_func
    lists of len(prompts) (a real or None each), requests empty or one per episode. NaN and inf pass: the trainer
    reports them as a divergence (they come from a reward, not from the environment's bookkeeping).
    first_episode: the batch index of prompts[0] (a process's share of the batch), for the episode numbers."""
    from alignfast.trainer.environments import EnvOutput

    n = len(prompts)
    if not isinstance(out, EnvOutput):
        _raise(env, "step", f"must return an EnvOutput, got {type(out).__name__}")
    _as_python_numbers(out)
    for name in ("scores", "answers", "requests"):
        if not _is_list(getattr(out, name)):
            _raise(env, "step", f"returned EnvOutput.{name} of type {type(getattr(out, name)).__name__}: it must "
                   "be a list")
    if len(out.scores) != n:
        _raise(env, "step", f"returned {len(out.scores)} scores for {n} episodes")
    if len(out.answers) != n:
        _raise(env, "step", f"returned {len(out.answers)} answers for {n} episodes (EnvOutput.answers[i]: the list "
               "of answers scored for episode i)")
    if out.requests and len(out.requests) != n:
        _raise(env, "step", f"returned {len(out.requests)} requests for {n} episodes (give one per episode, or none)")
    if not isinstance(out.per_func, dict):
        _raise(env, "step", f"returned EnvOutput.per_func of type {type(out.per_func).__name__}: it must be a dict "
               "{reward name: one score (or None) per episode}")
    for name, values in out.per_func.items():
        if not _is_list(values) or len(values) != n:
            got = f"{len(values)} values" if _is_list(values) else type(values).__name__
            _raise(env, "step", f"returned per_func['{name}'] with {got} for {n} episodes")
    for i, s in enumerate(out.scores):
        if s is None:
            unscored = [name for name, values in out.per_func.items() if values[i] is None]
            plural = "s" if len(unscored) > 1 else ""
            why = f": reward function{plural} {', '.join(repr(u) for u in unscored)} returned None for it" \
                if unscored else ""
            _raise(env, "step", f"returned no score (None) for episode {first_episode + i}{why}; prompt "
                   f"{str(prompts[i])[:80]!r}. Every episode needs a score: an unscored episode cannot be trained on")
        if not isinstance(s, numbers.Real):
            _raise(env, "step", f"returned scores[{i}] {_shown(s)}: it must be a number (a float), got "
                   f"{type(s).__name__}")
    for name, values in out.per_func.items():
        for i, v in enumerate(values):
            if v is not None and not isinstance(v, numbers.Real):
                _raise(env, "step", f"returned per_func['{name}'][{i}] {_shown(v)}: it must be a number or None, got "
                       f"{type(v).__name__}")
    for i, a in enumerate(out.answers):
        if not _is_list(a) or not all(isinstance(y, str) for y in a):
            kind = type(a).__name__ if not _is_list(a) else \
                f"a {type(a).__name__} holding {type(next(y for y in a if not isinstance(y, str))).__name__}"
            _raise(env, "step", f"returned answers[{i}] {_shown(a)}: it must be a list of str (the episode's "
                   f"answers), got {kind}")
    if not isinstance(out.timings, dict):
        _raise(env, "step", f"returned EnvOutput.timings of type {type(out.timings).__name__}: it must be a dict "
               "{name: seconds}")
    if not isinstance(out.generated_tokens, numbers.Integral):
        _raise(env, "step", f"returned EnvOutput.generated_tokens {_shown(out.generated_tokens)}: it must be an int")


def _as_python_numbers(out) -> None:
    """A torch tensor or numpy array of scores (or of one reward's values), and a 0-d tensor or numpy integer of
    generated tokens, as the lists and ints the engine uses: what the engine took before it checked (it built its
    tensors from them), converted in place with .tolist() / .item() as rewards._scores does."""
    if hasattr(out.scores, "tolist") and not isinstance(out.scores, (list, tuple)):
        out.scores = out.scores.tolist()
    if isinstance(out.scores, list):
        out.scores = [_scalar(s) for s in out.scores]
    if isinstance(out.per_func, dict):
        for name, values in out.per_func.items():
            if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
                out.per_func[name] = values.tolist()
            elif isinstance(values, list):
                out.per_func[name] = [_scalar(v) for v in values]
    value = _scalar(out.generated_tokens)
    out.generated_tokens = int(value) if isinstance(value, float) and value.is_integer() else value


def _scalar(value):
    """A one-element tensor or array as its Python number; anything else as it is (for the checks to judge: a
    several-element tensor's .item() would raise its own error, not the checks' one line)."""
    if isinstance(value, numbers.Real) or not hasattr(value, "item"):
        return value
    size = getattr(value, "numel", None)
    size = size() if callable(size) else getattr(value, "size", None)
    return value.item() if size == 1 else value

