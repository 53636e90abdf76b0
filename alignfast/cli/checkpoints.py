"""Loading a trained policy for evaluation: a `save_model` folder, a checkpoint-<step> folder (its policy/),
either holding full weights or a LoRA adapter (peft), with its tokenizer."""

from __future__ import annotations

from pathlib import Path

from alignfast.cli.errors import CLIError
from alignfast.cli.models import load_tokenizer


def policy_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CLIError(f"checkpoint not found: {p}")
    if (p / "policy").is_dir():  # output_dir/checkpoint-<step>/policy
        _check_intact(p)
        p = p / "policy"
    elif p.name == "policy" and (p.parent / "manifest.json").is_file():
        _check_intact(p.parent)
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

    from alignfast.trainer.base import ARM_FILE
    from alignfast.trainer.checkpoint import STATE_FILE

    p = Path(path).expanduser()
    checkpoint = p if (p / STATE_FILE).is_file() else p.parent if (p.parent / STATE_FILE).is_file() else None
    try:
        if checkpoint is not None:
            state = json.loads((checkpoint / STATE_FILE).read_text())
            return state.get("arm"), state.get("config")
        arm = json.loads((p / ARM_FILE).read_text()).get("arm") if (p / ARM_FILE).is_file() else None
        run_config = p.parent / "config.json"
        settings = json.loads(run_config.read_text()) if arm is not None and run_config.is_file() else None
        return arm, settings if isinstance(settings, dict) else None
    except (OSError, ValueError):  # unreadable: the loader's own checks speak for the folder
        return None, None


def trained_environment(path: str | Path) -> tuple[str | None, dict | None]:
    """(environment class, its describe() settings) that a PPO trainer recorded with a model folder (ARM_FILE, or a
    checkpoint-<step>'s trainer_state.json); (None, None) where none was recorded (a folder from before the record,
    or from elsewhere), settings None where the environment did not describe itself."""
    import json

    from alignfast.trainer.base import ARM_FILE
    from alignfast.trainer.checkpoint import STATE_FILE

    p = Path(path).expanduser()
    checkpoint = p if (p / STATE_FILE).is_file() else p.parent if (p.parent / STATE_FILE).is_file() else None
    source = checkpoint / STATE_FILE if checkpoint is not None else p / ARM_FILE
    try:
        record = json.loads(source.read_text()) if source.is_file() else {}
    except (OSError, ValueError):
        return None, None
    if not isinstance(record, dict):
        return None, None
    settings = record.get("environment_settings")
    return record.get("environment"), settings if isinstance(settings, dict) else None


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
