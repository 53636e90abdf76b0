"""Loads the compiled extension alignfast._C, if present, and remembers why not otherwise.

The extension registers C++ (CPU) and CUDA kernels for the schemas defined in alignfast.ops._library.
Without it every op still works: CUDA tensors use the Triton kernels where an op has them, and
everything else uses alignfast.reference. The reason is reported once, as a warning, on first use.
"""

from __future__ import annotations

import os
import warnings

_state: dict = {"tried": False, "module": None, "reason": None, "warned": False}


def load():
    """Import alignfast._C once. Returns the module, or None (see `reason()`)."""
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    if os.environ.get("ALIGNFAST_DISABLE_EXT", "0") == "1":
        _state["reason"] = "disabled by ALIGNFAST_DISABLE_EXT=1"
        return None
    import torch  # noqa: F401  - libtorch must be loaded before the module's symbols resolve

    try:
        from alignfast import _C  # type: ignore[attr-defined]
    except ImportError as err:
        msg = str(err)
        if "No module named" in msg:
            _state["reason"] = ("the extension alignfast._C is not built (install with the README's command, "
                                "or ALIGNFAST_BUILD_EXT was 0)")
        else:
            _state["reason"] = f"alignfast._C failed to load: {msg}"
        return None
    _state["module"] = _C
    return _C


def available() -> bool:
    return load() is not None


def cuda_compiled() -> bool:
    mod = load()
    return bool(mod is not None and getattr(mod, "cuda_compiled", 0))


def reason() -> str | None:
    load()
    return _state["reason"]


def warn_missing_once() -> None:
    """One clear warning per process when an op falls back because the extension is missing."""
    if _state["warned"] or available():
        return
    _state["warned"] = True
    warnings.warn(f"alignfast: {reason()}; ops use the plain-PyTorch reference on CPU", RuntimeWarning, stacklevel=3)
