"""Does a checkpoint belong to this run? Checked before any tensor is copied, so that resuming with another
model or another value head ends in one line naming the checkpoint and the difference (not a shape error from
deep inside torch, and never a silently half-restored run)."""

from __future__ import annotations

from pathlib import Path

from alignfast.ops._checks import AlignfastArgumentError


class CheckpointMismatchError(AlignfastArgumentError):
    """The checkpoint was written by a run with another model, value head or trainable set."""


def _fail(path: Path, message: str):
    raise CheckpointMismatchError(f"alignfast: cannot resume from {path}: {message}; resume with the run's own "
                                  "settings, or start a new run in another output_dir")


def check_resume_matches(path, trainable: dict, state: dict, model, config, *, value_model, value_head) -> None:
    path = Path(path)
    saved_cfg = state.get("config") or {}
    if (value_model is not None and "value_model" not in trainable) or \
            (value_head is not None and "value_head" not in trainable):
        _fail(path, f"it was written with value_head={saved_cfg.get('value_head')!r} and this run has "
                    f"value_head={config.value_head!r}")
    params = dict(model.named_parameters())
    saved = trainable.get("policy") or {}
    unknown = [n for n in saved if n not in params]
    if unknown:
        _fail(path, f"it holds policy parameter {unknown[0]!r}, which this policy does not have (was it written for "
                    "another model, or with/without LoRA?)")
    for name, value in saved.items():
        if tuple(value.shape) != tuple(params[name].shape):
            _fail(path, f"policy parameter {name!r} has shape {tuple(value.shape)} there and "
                        f"{tuple(params[name].shape)} in this policy (another model?)")
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    if missing:
        _fail(path, f"it does not hold trainable policy parameter {missing[0]!r} (written for another model, or "
                    "with/without LoRA?)")
    for label, module, key in (("value model", value_model, "value_model"), ("value head", value_head, "value_head")):
        if module is None:
            continue
        own = module.state_dict()
        absent = [n for n in own if n not in trainable[key]]
        if absent:
            _fail(path, f"its {label} lacks {absent[0]!r}, which this run's {label} has (another model?)")
        for name, value in trainable[key].items():
            if name not in own:
                _fail(path, f"its {label} has {name!r}, which this run's {label} does not (another model?)")
            if tuple(value.shape) != tuple(own[name].shape):
                _fail(path, f"its {label}'s {name!r} has shape {tuple(value.shape)} there and "
                            f"{tuple(own[name].shape)} here (another model?)")
