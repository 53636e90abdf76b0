"""Loading a trained policy for evaluation: a `save_model` folder, a checkpoint-<step> folder (its policy/),
either holding full weights or a LoRA adapter (peft), with its tokenizer."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

from alignfast.cli.errors import CLIError
from alignfast.cli.models import load_tokenizer


def refuse_unfinished(p: Path) -> None:
    """A temporary folder a killed save left (checkpoint.TMP_PREFIX: a checkpoint or final/ being written, or an old
    copy being replaced) may hold a model's files without the rest: never evaluated as if it were whole."""
    from alignfast.trainer import checkpoint as ckpt

    if any(name.startswith(ckpt.TMP_PREFIX) for name in (p.name, p.parent.name)):
        raise CLIError(f"{p} is a temporary folder that a save left unfinished ({ckpt.TMP_PREFIX}*: its writer was "
                       "killed), not a checkpoint or model; pass checkpoint-<step>/ or final/ (the run's next start "
                       "or --resume removes it)")


def model_root(path: str | Path, not_found: str) -> Path:
    """The model folder a flag names: a checkpoint-<step> gives its policy/, verified against its manifest (as a
    checkpoint's policy/ passed itself is); a missing folder (`not_found: <path>`) or one a killed save left is one
    line."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CLIError(f"{not_found}: {p}")
    refuse_unfinished(p)
    if (p / "policy").is_dir():  # output_dir/checkpoint-<step>/policy
        _check_intact(p)
        p = p / "policy"
    elif p.name == "policy" and (p.parent / "manifest.json").is_file():
        _check_intact(p.parent)
    return p


def policy_dir(path: str | Path) -> Path:
    p = model_root(path, "checkpoint not found")
    if (p / "metrics.jsonl").is_file():  # a run's output_dir: its config.json is the trainer's, not a model's
        runs = sorted(c.name for c in p.iterdir() if c.name == "final" or c.name.startswith("checkpoint-"))
        raise CLIError(f"{p} is a training run's folder, not a model; pass one of its model folders"
                       + (f": {', '.join(runs[-3:])}" if runs else " (final/ or checkpoint-<step>/)"))
    if not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
        from alignfast.trainer.proxy_model import CONFIG_NAME as PROXY_CONFIG

        if (p / PROXY_CONFIG).is_file():  # a proxy is no causal LM: its folder holds proxy_config.json
            raise CLIError(f"{p} is a Proxy-RLHF proxy (`alignfast train --method proxy`): pass it as "
                           "--proxy-checkpoint")
        raise CLIError(f"{p} holds no model (expected config.json, or adapter_config.json for a LoRA adapter); "
                       "pass a folder written by `alignfast train` (final/ or checkpoint-<step>/)")
    return p


def trained_as(path: str | Path) -> tuple[str | None, dict | None]:
    """(arm, trainer settings) of the run that wrote a model folder, where it says so: a checkpoint-<step>'s
    trainer_state.json holds both; a save_model folder holds its arm (trainer.base.ARM_FILE) and its run's
    config.json is beside it. (None, None) for a folder from elsewhere or from before the arm was recorded."""
    import json

    record, in_checkpoint = _trained_record(path)
    arm = record.get("arm")
    if in_checkpoint:
        return arm, record.get("config")
    run_config = Path(path).expanduser().parent / "config.json"
    try:
        settings = json.loads(run_config.read_text()) if arm is not None and run_config.is_file() else None
    except (OSError, ValueError):  # unreadable: the loader's own checks speak for the folder
        return None, None
    return arm, settings if isinstance(settings, dict) else None


def trained_environment(path: str | Path) -> tuple[str | None, dict | None]:
    """(environment class, its describe() settings) that a PPO trainer recorded with a model folder (ARM_FILE, or a
    checkpoint-<step>'s trainer_state.json); (None, None) where none was recorded (a folder from before the record,
    or from elsewhere), settings None where the environment did not describe itself."""
    record, _ = _trained_record(path)
    settings = record.get("environment_settings")
    return record.get("environment"), settings if isinstance(settings, dict) else None


@functools.lru_cache(maxsize=16)
def _read_record(source: str, mtime_ns: int) -> dict:
    import json

    record = json.loads(Path(source).read_text())
    return record if isinstance(record, dict) else {}


def _trained_record(path: str | Path) -> tuple[dict, bool]:
    """(the record the trainer left with a model folder, whether it is a checkpoint's trainer_state.json): a
    checkpoint-<step>'s (the folder's or its parent's) or the save_model folder's ARM_FILE; {} where there is none
    or it does not read. Read once per file version (eval asks several questions of one folder, and a checkpoint's
    state holds the whole history)."""
    from alignfast.trainer.base import ARM_FILE
    from alignfast.trainer.checkpoint import STATE_FILE

    p = Path(path).expanduser()
    checkpoint = p if (p / STATE_FILE).is_file() else p.parent if (p.parent / STATE_FILE).is_file() else None
    source = checkpoint / STATE_FILE if checkpoint is not None else p / ARM_FILE
    try:
        # a copy: callers may edit what they get, and the cached record must stay the file's
        return copy.deepcopy(_read_record(str(source.resolve()), source.stat().st_mtime_ns)), checkpoint is not None
    except (OSError, ValueError):  # absent or unreadable: the loader's own checks speak for the folder
        return {}, checkpoint is not None


def _check_intact(checkpoint: Path) -> None:
    """A checkpoint's files against its manifest (a truncated model file would fail deep inside the loader)."""
    from alignfast.trainer import checkpoint as ckpt

    if not (checkpoint / ckpt.MANIFEST).is_file():
        return  # written before checkpoints had manifests
    try:
        ckpt.verify(checkpoint)
    except ckpt.CorruptCheckpointError as err:
        raise CLIError(str(err).removeprefix("alignfast: ")) from None


def load_policy(path: str | Path, *, base_spec: dict, role: str, device=None):
    """(model, tokenizer) of a trained policy; a LoRA adapter is merged into its base for fast decoding."""
    from alignfast.cli.models import _load, torch_dtype

    p = policy_dir(path)
    if (p / "adapter_config.json").is_file():
        try:
            from peft import AutoPeftModelForCausalLM
        except ImportError:
            raise CLIError(f"{p} is a LoRA adapter: loading it needs `peft` (pip install 'alignfast[peft]')") from None
        model = _load(AutoPeftModelForCausalLM.from_pretrained, str(p), f"{role} adapter",
                      dtype=torch_dtype(base_spec.get("dtype")))
        model = model.merge_and_unload()
    else:
        from transformers import AutoModelForCausalLM

        model = _load(AutoModelForCausalLM.from_pretrained, str(p), f"{role} model",
                      dtype=torch_dtype(base_spec.get("dtype")))
    if device is not None:
        model = model.to(device)
    has_tokenizer = (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file()
    tokenizer = load_tokenizer({"model": str(p)} if has_tokenizer else base_spec, role)
    return model.eval().requires_grad_(False), tokenizer
