"""Loading the run's models by hub name or local path, with one clear line when that fails.

No network is assumed: a name that is neither a local directory nor in the Hugging Face cache fails
with a message that says so, instead of transformers' multi-screen traceback.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from alignfast.cli.errors import CLIError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "auto": "auto"}


def torch_dtype(name: str | None):
    import torch

    if name is None:
        return None
    key = DTYPES.get(str(name).lower())
    if key is None:
        raise CLIError(f"unknown dtype '{name}' (use one of {', '.join(sorted(set(DTYPES)))})")
    return key if key == "auto" else getattr(torch, key)


def _why(err: Exception, name: str) -> str:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not Path(name).exists() and ("offline" in str(err).lower() or "connect" in str(err).lower()
                                    or "not a local folder" in str(err).lower()
                                    or "does not appear to have" in str(err).lower()
                                    or isinstance(err, OSError)):
        return (f"'{name}' is not a local directory and could not be found in the Hugging Face cache "
                f"(no network here?): {first}")
    return first


def _load(loader: Callable, name: str, role: str, **kwargs):
    try:
        return loader(name, **{k: v for k, v in kwargs.items() if v is not None})
    except (OSError, ValueError, EnvironmentError) as err:
        raise CLIError(f"cannot load the {role} from {_why(err, name)}") from None


def load_tokenizer(spec: dict, role: str):
    from transformers import AutoTokenizer

    name = spec.get("tokenizer") or spec["model"]
    return _load(AutoTokenizer.from_pretrained, str(name), f"{role} tokenizer",
                 trust_remote_code=spec.get("trust_remote_code"), revision=spec.get("revision"))


def load_causal_lm(spec: dict, role: str, *, device=None):
    from transformers import AutoModelForCausalLM

    model = _load(AutoModelForCausalLM.from_pretrained, str(spec["model"]), f"{role} model",
                  dtype=torch_dtype(spec.get("dtype")), trust_remote_code=spec.get("trust_remote_code"),
                  revision=spec.get("revision"))
    return model.to(device) if device is not None else model


def load_reward_model(spec: dict, *, device=None):
    from transformers import AutoModelForSequenceClassification

    model = _load(AutoModelForSequenceClassification.from_pretrained, str(spec["model"]), "reward model",
                  dtype=torch_dtype(spec.get("dtype")), trust_remote_code=spec.get("trust_remote_code"),
                  revision=spec.get("revision"))
    return model.to(device) if device is not None else model


def import_callable(path: str, role: str) -> Callable:
    """'package.module:function' -> the function."""
    if not isinstance(path, str) or ":" not in path:
        raise CLIError(f"{role} '{path}' must look like 'package.module:function'")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CLIError(f"{role} '{path}': cannot import {module_name} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise CLIError(f"{role} '{path}': {module_name} has no callable '{attr}'")
    return fn
