"""Loading the run's models by hub name or local path, with one clear line when that fails.

No network is assumed: a name that is neither a local directory nor in the Hugging Face cache fails
with a message that says so, instead of transformers' multi-screen traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from alignfast.cli.errors import CLIError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "auto": "auto"}


def quiet_transformers() -> None:
    """No per-file weight-loading bars: the commands show their own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def torch_dtype(name: str | None):
    import torch

    if name is None:
        return None
    key = DTYPES.get(str(name).lower())
    if key is None:
        raise CLIError(f"unknown dtype '{name}' (use one of {', '.join(sorted(set(DTYPES)))})")
    return key if key == "auto" else getattr(torch, key)


TOY_PREFIX = "toy:"


def resolve_model_name(name) -> str:
    """'toy:prompter' / 'toy:target' name the embedded world's models (alignfast.toy); anything else as is."""
    name = str(name)
    if name.startswith(TOY_PREFIX):
        from alignfast.toy import load_world

        world = load_world()
        paths = {"prompter": world.prompter_path, "target": world.target_path}
        key = name[len(TOY_PREFIX):]
        if key not in paths:
            raise CLIError(f"unknown toy model '{name}' (use toy:prompter or toy:target)")
        return paths[key]
    return name


def _why(err: Exception, name: str) -> str:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not Path(name).exists() and ("offline" in str(err).lower() or "connect" in str(err).lower()
                                    or "not a local folder" in str(err).lower()
                                    or "does not appear to have" in str(err).lower()
                                    or isinstance(err, OSError)):
        return (f"'{name}' is not a local directory and could not be found in the Hugging Face cache "
                f"(no network here?): {first}")
    return first


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _quiet_hub():
    """The hub client logs a warning per retry (five, over ~25 s, without a network): keep them off stderr;
    the one line we print on failure says what happened."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _load(loader: Callable, name: str, role: str, **kwargs):
    """Local folder or Hugging Face cache first (instant, no network); the hub only when that fails and
    HF_HUB_OFFLINE (read now, not at import) allows it."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return loader(name, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        if Path(name).exists() or _offline():
            raise CLIError(f"cannot load the {role} from {_why(err, name)}") from None
    try:
        with _quiet_hub():
            return loader(name, **kwargs)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load the {role} from {_why(err, name)}") from None


def load_tokenizer(spec: dict, role: str):
    from transformers import AutoTokenizer

    name = resolve_model_name(spec.get("tokenizer") or spec["model"])
    return _load(AutoTokenizer.from_pretrained, name, f"{role} tokenizer",
                 trust_remote_code=spec.get("trust_remote_code"), revision=spec.get("revision"))


def load_causal_lm(spec: dict, role: str, *, device=None):
    from transformers import AutoModelForCausalLM

    model = _load(AutoModelForCausalLM.from_pretrained, resolve_model_name(spec["model"]), f"{role} model",
                  dtype=torch_dtype(spec.get("dtype")), trust_remote_code=spec.get("trust_remote_code"),
                  revision=spec.get("revision"))
    return model.to(device) if device is not None else model


def load_reward_model(spec: dict, *, device=None):
    from transformers import AutoModelForSequenceClassification

    model = _load(AutoModelForSequenceClassification.from_pretrained, resolve_model_name(spec["model"]), "reward model",
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
