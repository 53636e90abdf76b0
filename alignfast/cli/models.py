"""Loading the run's models by hub name or local path, with one clear line when that fails.

No network is assumed: a name that is neither a local directory nor in the Hugging Face cache fails
with a message that says so, instead of transformers' multi-screen traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
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
    return f"'{name}': {first}"


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


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, when its host name does not even resolve (no network); None otherwise.

    Without this check a typo'd model name costs two rounds of the hub client's five retries (~50 s)
    before the same one-line error. Behind a proxy the local resolver proves nothing, so it is skipped."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname
    except (ImportError, AttributeError):
        return None
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        return (f"the hub's host {host} does not resolve ({err.strerror or err}): no network here? "
                "(HF_HUB_OFFLINE=1 skips the hub)")
    return None


def _in_hub_cache(name: str, revision: str | None) -> bool:
    """Whether the Hugging Face cache holds files of repository `name` (no network is touched)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # cannot tell: let the loader decide
        return True
    for filename in ("config.json", "tokenizer_config.json", "adapter_config.json"):
        try:
            if isinstance(try_to_load_from_cache(name, filename, revision=revision), str):
                return True
        except Exception:  # noqa: BLE001 - an invalid repository id is simply not cached
            return False
    return False


def _load(loader: Callable, name: str, role: str, *, local_kwargs: dict | None = None, **kwargs):
    """Local folder or Hugging Face cache first (instant, no network); the hub only when that fails and
    HF_HUB_OFFLINE (read now, not at import) allows it.

    A name that is neither a folder nor cached is not handed to the loader with local_files_only: some
    transformers releases still look for a PEFT adapter on the hub then (five retries, ~25 s and a
    warning per retry without a network). local_kwargs: extra arguments for the local attempt only."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    local = Path(name).exists() or _in_hub_cache(name, kwargs.get("revision"))
    if local:
        try:
            with _quiet_hub():
                return loader(name, local_files_only=True, **(local_kwargs or {}), **kwargs)
        except (OSError, ValueError) as err:
            if Path(name).exists() or _offline():
                raise CLIError(f"cannot load the {role} from {_why(err, name)}") from None
    elif _offline():
        raise CLIError(f"cannot load the {role}: '{name}' is not a local directory and is not in the Hugging Face "
                       "cache (HF_HUB_OFFLINE is set, so the hub was not asked)")
    else:
        why = _hub_unreachable()
        if why:
            raise CLIError(f"cannot load the {role}: '{name}' is not a local directory and is not in the Hugging "
                           f"Face cache, and {why}")
    try:
        with _quiet_hub():
            return loader(name, **kwargs)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load the {role} from {_why(err, name)}") from None


# Model loaders get this on their local attempt: transformers 5 otherwise asks the hub for an adapter config
# even with local_files_only=True.
_LOCAL_ADAPTER_KWARGS = {"adapter_kwargs": {"local_files_only": True}}


# Any one of these makes a folder a tokenizer's (fast, SentencePiece, BPE and WordPiece formats).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt", "sentencepiece.bpe.model", "tekken.json")
# The run-file section whose `tokenizer` key points a role at another folder.
TOKENIZER_SETTINGS = {"prompter": "prompter", "target": "target", "reward model": "reward", "aligner": "aligner"}


def load_tokenizer(spec: dict, role: str):
    from transformers import AutoTokenizer

    name = resolve_model_name(spec.get("tokenizer") or spec["model"])
    folder = Path(str(name)).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        # transformers' own error here stops mid-sentence ("Couldn't instantiate the backend tokenizer from one of: ")
        section = TOKENIZER_SETTINGS.get(role)
        where = (f"point {section}.tokenizer at a folder or hub name that has one" if section else
                 "save the tokenizer beside the model")
        raise CLIError(f"cannot load the {role} tokenizer: {folder} holds no tokenizer files "
                       f"({', '.join(TOKENIZER_FILES[:3])}, ...): {where}")
    return _load(AutoTokenizer.from_pretrained, name, f"{role} tokenizer",
                 trust_remote_code=spec.get("trust_remote_code"), revision=spec.get("revision"))


def load_causal_lm(spec: dict, role: str, *, device=None):
    from transformers import AutoModelForCausalLM

    model = _load(AutoModelForCausalLM.from_pretrained, resolve_model_name(spec["model"]), f"{role} model",
                  local_kwargs=_LOCAL_ADAPTER_KWARGS, dtype=torch_dtype(spec.get("dtype")),
                  trust_remote_code=spec.get("trust_remote_code"),
                  revision=spec.get("revision"))
    return model.to(device) if device is not None else model


def load_reward_model(spec: dict, *, device=None):
    from transformers import AutoModelForSequenceClassification

    name = resolve_model_name(spec["model"])
    model, info = _load(AutoModelForSequenceClassification.from_pretrained, name, "reward model",
                        local_kwargs=_LOCAL_ADAPTER_KWARGS, dtype=torch_dtype(spec.get("dtype")),
                        trust_remote_code=spec.get("trust_remote_code"),
                        revision=spec.get("revision"), output_loading_info=True)
    # A checkpoint without a trained score head (a causal LM, a bare backbone) loads with a random one: its
    # "reward" would be noise. The head is what lies outside the backbone (base_model_prefix).
    prefix = getattr(model, "base_model_prefix", "") or ""
    head = sorted(k for k in (info or {}).get("missing_keys", ()) if prefix and not k.startswith(prefix + "."))
    if head:
        raise CLIError(f"reward.model '{name}' has no trained score head ({', '.join(head)} newly initialised): it is "
                       "not a sequence-classification reward model (a causal LM?); point reward.model at a reward "
                       "model, or score with reward.functions")
    return model.to(device) if device is not None else model


def import_callable(path: str, role: str, *, search_dirs: Sequence[str | os.PathLike] = ()) -> Callable:
    """'package.module:function' or 'path/to/file.py:function' -> the function.

    search_dirs (the run file's folder, then the working directory) are where a user's own module lives: a
    module name is looked up in them after sys.path (they are appended to it, so a local file never shadows
    an installed package), and a relative file path is taken from the first of them that holds it."""
    if not isinstance(path, str) or ":" not in path:
        raise CLIError(f"{role} '{path}' must look like 'package.module:function' or 'path/to/file.py:function'")
    module_name, _, attr = path.rpartition(":")
    dirs = [Path(d).expanduser().resolve() for d in search_dirs]
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        module = _import_file(module_name, dirs, role, path)
    else:
        for d in dirs:
            if str(d) not in sys.path:
                sys.path.append(str(d))
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            where = f" (looked in {', '.join(map(str, dirs))} and sys.path)" if dirs else ""
            raise CLIError(f"{role} '{path}': cannot import {module_name}: {err}{where}; a file can be named "
                           f"directly, e.g. 'path/to/{module_name.split('.')[-1]}.py:{attr}'") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise CLIError(f"{role} '{path}': {module_name} has no callable '{attr}'")
    return fn


def _import_file(file: str, dirs: list[Path], role: str, path: str):
    """The module in a .py file, imported once per resolved path under a name derived from it (so two files
    both called rewards.py stay apart, and functions defined there pickle by that name)."""
    import hashlib
    import importlib.util

    p = Path(file).expanduser()
    tried = [p] if p.is_absolute() else [d / p for d in dirs] or [Path.cwd() / p]
    found = next((t.resolve() for t in tried if t.is_file()), None)
    if found is None:
        raise CLIError(f"{role} '{path}': file not found (looked for {', '.join(map(str, tried))})")
    name = f"alignfast_user_{found.stem}_{hashlib.sha1(str(found).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, found)
    if spec is None or spec.loader is None:
        raise CLIError(f"{role} '{path}': {found} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
