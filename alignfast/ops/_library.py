"""The `alignfast` torch.library namespace and the choice of implementation per op and device.

Every op module does three things with this file:
  1. `define_op(name, schema, gpu_impl=..., triton=...)`: the schema, once, in Python (so the op exists,
     with its fake/meta impl, whether or not the extension is built; the C++ code in csrc/ registers
     kernels only, with TORCH_LIBRARY_IMPL);
  2. `torch.library.register_fake(...)` / `register_autograd(...)` on the op;
  3. in its public wrapper, `use_reference(name, tensor)` to decide between torch.ops.alignfast.<name>
     and the alignfast.reference function.

Backend choice, per call:
  - `force_backend("reference")` (or ALIGNFAST_BACKEND=reference) sends every op to the reference;
  - otherwise the compiled/Triton kernel for the tensor's device when the dispatcher has one;
  - otherwise the reference, with one warning per process saying why.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from dataclasses import dataclass

import torch

from alignfast import _ext

NAMESPACE = "alignfast"
LIB = torch.library.Library(NAMESPACE, "DEF")

_BACKENDS = ("auto", "reference")
_local = threading.local()


@dataclass(frozen=True)
class OpInfo:
    """What an op is implemented with. gpu_impl: 'cuda' (CUDA C++ in alignfast._C), 'triton', or 'torch'
    (plain PyTorch ops registered for CUDA: a helper whose GPU side needs no custom kernel)."""

    name: str
    gpu_impl: str
    triton: str | None = None  # "module:function" under alignfast.kernels, when gpu_impl == 'triton'
    public: bool = True  # False for helper ops (e.g. a backward) that info need not list


OPS: dict[str, OpInfo] = {}


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def define_op(name: str, schema: str, *, gpu_impl: str, triton: str | None = None, public: bool = True,
              torch_impl=None) -> OpInfo:
    """Define `alignfast::<name>` with `schema` (the part after the name, e.g. '(Tensor x) -> Tensor').

    With gpu_impl='triton', `triton` names 'module:function' in alignfast.kernels; a CUDA kernel that
    imports it on first call is registered now, so importing alignfast never imports Triton.
    With gpu_impl='torch', `torch_impl` (a function of the op's arguments, in torch ops) is its CUDA kernel.
    """
    if gpu_impl not in ("cuda", "triton", "torch"):
        raise ValueError(f"gpu_impl must be 'cuda', 'triton' or 'torch', got {gpu_impl!r}")
    if name in OPS:
        return OPS[name]
    LIB.define(name + schema)
    info = OpInfo(name=name, gpu_impl=gpu_impl, triton=triton, public=public)
    OPS[name] = info
    if gpu_impl == "triton":
        if triton is None:
            raise ValueError(f"op {name!r}: gpu_impl='triton' needs triton='module:function'")
        LIB.impl(name, _lazy_triton_kernel(triton), "CUDA")
    if gpu_impl == "torch":
        if torch_impl is None:
            raise ValueError(f"op {name!r}: gpu_impl='torch' needs torch_impl")
        LIB.impl(name, torch_impl, "CUDA")
    return info


def _lazy_triton_kernel(target: str):
    module_name, fn_name = target.split(":")
    cache: dict = {}

    def kernel(*args, **kwargs):
        fn = cache.get("fn")
        if fn is None:
            fn = getattr(importlib.import_module(f"alignfast.kernels.{module_name}"), fn_name)
            cache["fn"] = fn
        return fn(*args, **kwargs)

    kernel.__name__ = f"triton_{fn_name}"
    return kernel


def has_kernel(name: str, device_type: str) -> bool:
    """Whether the dispatcher has a backend kernel for this op on this device type."""
    _ext.load()
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname(name), key)


# A registry lookup is constant while compiled code runs, so torch.compile may fold it instead of
# breaking the graph. This is what torch.compiler.assume_constant_result does; calling it would import
# torch._dynamo (and Triton) on `import alignfast.ops`, ~1.5 s that eager users should not pay, so the
# marker is set directly. If a torch release renames it, compiled wrappers get a graph break, not a
# wrong answer (tests/ops compile the wrappers with fullgraph=True and would say so).
has_kernel._dynamo_marked_constant = True  # type: ignore[attr-defined]


def current_backend() -> str:
    forced = getattr(_local, "backend", None)
    if forced is not None:
        return forced
    env = os.environ.get("ALIGNFAST_BACKEND", "auto").strip().lower() or "auto"
    if env not in _BACKENDS:
        raise ValueError(f"ALIGNFAST_BACKEND must be one of {_BACKENDS}, got {env!r}")
    return env


@contextlib.contextmanager
def force_backend(backend: str):
    """Run the ops inside the block with `backend` ('auto' or 'reference'), on this thread."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    previous = getattr(_local, "backend", None)
    _local.backend = backend
    try:
        yield
    finally:
        _local.backend = previous


def triton_available() -> bool:
    """Whether Triton imports (checked once; the lazily registered CUDA kernels of Triton ops import it)."""
    if "triton" not in _found:
        try:
            import triton  # noqa: F401
        except ImportError:
            _found["triton"] = False
        else:
            _found["triton"] = True
    return _found["triton"]


_found: dict[str, bool] = {}
triton_available._dynamo_marked_constant = True  # type: ignore[attr-defined]  # as has_kernel, for torch.compile


_warned: set[str] = set()


def use_reference(name: str, tensor: torch.Tensor) -> bool:
    """True when the public wrapper should call the reference instead of torch.ops.alignfast.<name>."""
    if current_backend() == "reference":
        return True
    device_type = tensor.device.type
    if device_type == "cuda" and OPS[name].gpu_impl == "triton" and not triton_available():
        # The CUDA kernel registered for a Triton op imports Triton on its first call: without Triton, the
        # reference (as `alignfast.info` reports), not an ImportError from inside the dispatcher.
        if "triton" not in _warned:
            _warned.add("triton")
            warnings.warn("alignfast: triton is not installed; the Triton ops use the plain-PyTorch reference on "
                          "CUDA (pip install triton)", RuntimeWarning, stacklevel=3)
        return True
    if has_kernel(name, device_type):
        return False
    _ext.warn_missing_once()
    return True


def op(name: str):
    """torch.ops.alignfast.<name>.default"""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def describe(name: str, device_type: str) -> tuple[str, str]:
    """(implementation, why) of op `name` on `device_type`, for `python -m alignfast.info`."""
    info = OPS[name]
    if current_backend() == "reference":
        return "reference", "forced by ALIGNFAST_BACKEND=reference"
    if device_type == "cpu":
        if has_kernel(name, "cpu"):
            return "C++", "alignfast._C"
        return "reference", _ext.reason() or "alignfast._C has no CPU kernel for this op"
    if info.gpu_impl == "torch":
        return "torch", "plain PyTorch ops (no custom GPU kernel)"
    if info.gpu_impl == "cuda":
        if has_kernel(name, "cuda") and _ext.cuda_compiled():
            return "CUDA C++", "alignfast._C (compiled with nvcc)"
        why = _ext.reason() or "alignfast._C was built without CUDA (nvcc not found at build time)"
        return "reference", why
    if not triton_available():
        return "reference", "triton is not installed"
    return "Triton", f"alignfast.kernels.{info.triton.split(':')[0]}"
