"""alignfast: align a frozen LLM with a small PPO-trained prompter (Align-Pro), on fused kernels.

Importing this package is cheap and safe: it never initialises CUDA, never imports Triton or
transformers, and never fails because the compiled extension is missing. Submodules load on first use:

    alignfast.ops         fused ops (C++ on CPU, CUDA/Triton on GPU), with autograd and torch.compile support
    alignfast.reference   the same ops in plain PyTorch: the specification
    alignfast.rollout     prompter sampling, frozen-target engines, rewards
    alignfast.trainer     AlignProConfig, AlignProTrainer, checkpoints
    alignfast.aligner     AlignerConfig, AlignerTrainer (SFT corrector), AlignerPipeline
    alignfast.eval        mean reward, variance, win rate; tables
    alignfast.toy         the embedded world behind `alignfast demo`
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {"ops", "reference", "rollout", "trainer", "aligner", "eval", "toy", "info", "cli"}
_LAZY_ATTRS = {
    "AlignProConfig": "alignfast.trainer",
    "AlignProTrainer": "alignfast.trainer",
    "OracleTrainer": "alignfast.trainer",
    "AlignerConfig": "alignfast.aligner",
    "AlignerTrainer": "alignfast.aligner",
    "AlignerPipeline": "alignfast.aligner",
    "ProxyRLHFConfig": "alignfast.trainer",
    "ProxyRLHFTrainer": "alignfast.trainer",
}

__all__ = ["__version__", *sorted(_SUBMODULES), *sorted(_LAZY_ATTRS)]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"alignfast.{name}")
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    raise AttributeError(f"module 'alignfast' has no attribute {name!r}")


def __dir__():
    return __all__
