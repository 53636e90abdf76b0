"""Argument validation for the public ops: every error names the argument it is about.

Checks run in the Python wrapper before dispatch, so the C++/CUDA/Triton kernels may assume
well-formed input. Data-dependent checks (token ids in range) cost one reduction; they can be
turned off with ALIGNFAST_SKIP_DATA_CHECKS=1 where a sync per call matters more than the message.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AlignfastArgumentError(ValueError):
    """Bad input to an alignfast op or config; the message names the argument."""


def fail(name: str, message: str):
    raise AlignfastArgumentError(f"alignfast: argument '{name}' {message}")


def tensor(name: str, t, *, ndim: int | Sequence[int] | None = None, min_ndim: int | None = None,
           dtypes: Iterable[torch.dtype] | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        fail(name, f"must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            fail(name, f"must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        fail(name, f"must have at least {min_ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            fail(name, f"must have dtype in {[str(d).replace('torch.', '') for d in dtypes]}, got {str(t.dtype).replace('torch.', '')}")
    return t


def same_shape(ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor, shape=None):
    want = tuple(ref.shape) if shape is None else tuple(shape)
    if tuple(t.shape) != want:
        fail(name, f"has shape {tuple(t.shape)} but must match '{ref_name}' {want}")


def same_device(ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor):
    if t.device != ref.device:
        fail(name, f"is on {t.device} but '{ref_name}' is on {ref.device}")


def mask(name: str, m, like_name: str, like: torch.Tensor) -> torch.Tensor:
    """A mask is bool (or 0/1 integer/float, converted) of the same shape and device as `like`."""
    tensor(name, m)
    same_shape(like_name, like, name, m)
    same_device(like_name, like, name, m)
    if m.dtype != torch.bool:
        if m.dtype.is_floating_point or m.dtype.is_complex:
            fail(name, f"must be a bool (or 0/1 integer) tensor, got {m.dtype}")
        m = m != 0
    return m


def finite(name: str, value) -> float:
    if isinstance(value, (str, bytes, bool)):  # float('1e-3') and float(True) would pass silently
        fail(name, f"must be a real number, got {value!r} ({type(value).__name__})")
    try:
        v = float(value)
    except (TypeError, ValueError):
        fail(name, f"must be a real number, got {value!r}")
    if not math.isfinite(v):
        fail(name, f"must be finite, got {value!r}")
    return v


def in_range(name: str, value, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    v = finite(name, value)
    if (v < lo or (lo_open and v == lo)) or (v > hi or (hi_open and v == hi)):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        fail(name, f"must be in {lb}{lo}, {hi}{rb}, got {value!r}")
    return v


def positive(name: str, value) -> float:
    v = finite(name, value)
    if v <= 0:
        fail(name, f"must be > 0, got {value!r}")
    return v


def non_negative(name: str, value) -> float:
    v = finite(name, value)
    if v < 0:
        fail(name, f"must be >= 0, got {value!r}")
    return v


# The smallest temperature whose reciprocal is a finite float32: the kernels scale logits by 1/temperature in float32.
MIN_TEMPERATURE = 1.0 / 3.4028234663852886e38


def temperature(name: str, value, *, zero_is_greedy: bool = False) -> float:
    """A temperature: finite, > 0 (>= 0 where 0 means greedy), and not so small that 1/temperature overflows
    float32 (NaN log-probs, where a clear error is due)."""
    v = non_negative(name, value) if zero_is_greedy else positive(name, value)
    if 0 < v < MIN_TEMPERATURE:
        fail(name, f"({value!r}) is below {MIN_TEMPERATURE:.4g}: 1/temperature overflows float32, in which the "
             "kernels scale the logits" + ("; use 0 for greedy" if zero_is_greedy else ""))
    return v


def output_folder(name: str, value) -> str:
    """A run's output folder: a non-empty path. An empty one ('' from an unset shell variable, `output_dir: ""`)
    would be the working directory, where a run's checkpoints, metrics and lock would land among other files."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        fail(name, f"must name a folder, got {value!r} (an empty value would write the run into the working "
             "directory; give a folder such as 'runs/my-run')")
    return value


def optional_text(name: str, value) -> str | None:
    """None, or a string with more than whitespace (a system message, say: an empty one would be sent as such)."""
    if value is not None and (not isinstance(value, str) or not value.strip()):
        fail(name, f"must be a non-empty string (or None), got {value!r}")
    return value


def choice(name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        fail(name, f"must be one of {list(allowed)}, got {value!r}")
    return value


def token_ids(name: str, tokens: torch.Tensor, vocab_size: int, valid: torch.Tensor | None = None):
    """Token ids at valid positions must lie in [0, vocab_size)."""
    if tokens.dtype not in (torch.int64, torch.int32):
        fail(name, f"must be an int64 or int32 tensor of token ids, got {tokens.dtype}")
    if os.environ.get("ALIGNFAST_SKIP_DATA_CHECKS", "0") == "1" or tokens.numel() == 0 or tokens.is_meta:
        return  # (meta tensors have shapes, no values: shape-only use, as torch.compile's fake tensors)
    bad = (tokens < 0) | (tokens >= vocab_size)
    if valid is not None:
        bad = bad & valid
    if bool(bad.any()):
        first = tokens[bad][0].item()
        fail(name, f"holds token id {first} outside [0, {vocab_size}) at a valid position")


def device(name: str, value, *, require_available: bool = True) -> torch.device:
    """A torch device spelling ('cpu', 'cuda', 'cuda:1', a torch.device) that this machine has."""
    try:
        d = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        fail(name, f"is not a device torch knows, got {value!r} (e.g. 'cpu', 'cuda', 'cuda:1')")
    if not require_available or d.type in ("cpu", "meta"):
        return d
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            fail(name, f"is {value!r} but this machine has no CUDA device torch can use")
        if d.index is not None and d.index >= n:
            fail(name, f"is {value!r} but this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return d
    try:
        torch.empty(0, device=d)
    except (RuntimeError, AssertionError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        fail(name, f"is {value!r}, which this machine cannot use ({first})")
    return d
