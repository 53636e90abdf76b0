"""Regional compilation of a transformer's decoder layers for the fast path's training and scoring forwards.

A causal LM's backbone is N copies of one decoder-layer class. torch.compile of each layer's call (as
accelerate's `compile_regions` and the PyTorch regional-compilation recipe do) traces that class once:
the parameters are graph inputs, so one compiled graph serves every layer of the policy, the reference
policy and the critic, and the compile costs one layer's trace, not N. Inductor then fuses the
elementwise chains between the GEMMs (RMSNorm, rotary embedding, the SiLU gate, residual adds, and their
backward), which eager PyTorch runs as separate memory-bound ops; the GEMMs and the attention are the
same library calls. Values change by float32 rounding only (fused elementwise code sums in another order).

dynamic=True: the sequence length of a rollout (longest query + longest response) changes from step to
step; with dynamic shapes one graph serves every length instead of a recompile per new length.

The compiled call is switched on only inside `active()`, around the policy's, the reference policy's and
the critic's full-sequence forwards: the sampler's KV-cached decode (a cache object updated in place, one
token per call) keeps the eager layers.
"""

from __future__ import annotations

import contextlib
import shutil

import torch
from torch import nn

from alignfast.ops._checks import fail

# torch.compile's backend for the layers; the default-run tests set "eager" (dynamo's graphs, no codegen).
COMPILE_BACKEND = "inductor"


def decoder_layers(backbone: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a backbone: the modules of its `layers` ModuleList (Llama, Qwen2, Mistral, ...)."""
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        fail("torch_compile", f"cannot find the decoder layers of {type(backbone).__name__} (no `layers` "
             "ModuleList); set torch_compile: false")
    return list(layers)


def check_compile_available(device: torch.device) -> None:
    """A clear error before any model work when torch.compile cannot run here."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        fail("torch_compile", "torch.compile is not supported on this Python / platform; set torch_compile: false")
    if device.type == "cpu":
        from torch._inductor import config as inductor_config

        compiler = inductor_config.cpp.cxx[0] if isinstance(inductor_config.cpp.cxx, tuple) and \
            inductor_config.cpp.cxx[0] else "g++"
        if shutil.which(compiler) is None and shutil.which("g++") is None and shutil.which("clang++") is None:
            fail("torch_compile", "needs a C++ compiler on CPU (inductor builds its kernels with g++ or clang++); "
                 "install one or set torch_compile: false")


class CompiledLayers:
    """The decoder layers of some backbones, each with a compiled call that `active()` switches on."""

    def __init__(self, backbones: list[nn.Module], *, backend: str | None = None):
        """backend: torch.compile's; "eager" (dynamo's tracing without code generation) lets the tests
        exercise the switching and the graphs cheaply. None: COMPILE_BACKEND."""
        backend = backend or COMPILE_BACKEND
        self._compiled: list[tuple[nn.Module, object]] = []
        for backbone in backbones:
            for layer in decoder_layers(backbone):
                if any(layer is seen for seen, _ in self._compiled):
                    continue  # a backbone shared by two of the models (LoRA's reference is the policy itself)
                layer.compile(dynamic=True, backend=backend)  # sets layer._compiled_call_impl; kept off until active()
                self._compiled.append((layer, layer._compiled_call_impl))
                layer._compiled_call_impl = None

    def __len__(self) -> int:
        return len(self._compiled)

    @contextlib.contextmanager
    def active(self):
        """Inside: the layers run their compiled call (forward and, under grad, backward)."""
        for layer, call in self._compiled:
            layer._compiled_call_impl = call
        try:
            yield
        finally:
            for layer, _ in self._compiled:
                layer._compiled_call_impl = None


def attach_compiled_layers(device: torch.device, policy, ref_policy, value_model=None) -> CompiledLayers:
    """Compile the decoder layers of the policy, the reference policy and a separate critic; each of their
    full-sequence forwards switches the compiled calls on (CausalLMPolicy.compiled, ValueModel.compiled)."""
    check_compile_available(device)
    backbones = [policy.backbone, ref_policy.backbone] + ([value_model.backbone] if value_model is not None else [])
    compiled = CompiledLayers(backbones)
    policy.compiled = ref_policy.compiled = compiled
    if value_model is not None:
        value_model.compiled = compiled
    return compiled
