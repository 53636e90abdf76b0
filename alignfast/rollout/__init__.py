"""Rollouts: the trainable policy's sampling, frozen-model generation engines, and rewards.

The interfaces here are shared by Align-Pro (prompter -> frozen target), the Oracle arm (the target
trained directly), and later Aligner (target -> corrector) and Proxy-RLHF (a model gating the
target's tokens): an engine turns prompts into completions; a reward turns (prompts, completions,
extra columns) into one float per completion.

Names load lazily so that `import alignfast.rollout` does not import transformers.
"""

from __future__ import annotations

import importlib

from alignfast.rollout.engine import Completion, EngineRequestError, TargetEngine

# name -> module under alignfast.rollout (one line per public name; keep sorted)
_LAZY = {
    "HFEngine": "hf_engine",
    "OpenAIEngine": "openai_engine",
    "RewardFunctionError": "rewards",
    "ProxyDecoder": "proxy_decoder",
    "VLLMEngine": "vllm_engine",
}

__all__ = ["Completion", "EngineRequestError", "TargetEngine", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"alignfast.rollout.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'alignfast.rollout' has no attribute {name!r}")
