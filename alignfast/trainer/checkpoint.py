"""Atomic checkpoints: everything a run needs to continue exactly where it stopped.

Layout of output_dir/checkpoint-<step>/:
    trainable.pt        the parameters that training changes (policy or its LoRA adapter, value model)
    optimizer.pt        optimizer state;   scheduler.pt: LR scheduler state
    rng.pt              python / numpy / torch (CPU and CUDA) generator states
    trainer_state.json  step, episode, KL controller, metrics so far, the config
    policy/             the policy in save_pretrained form (what a user loads afterwards)

A checkpoint is written into a temporary sibling directory and renamed into place, so a crash
(or a NaN stop) never leaves a half-written checkpoint-<step>, and the previous ones stay intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, trainable: dict, optimizer, scheduler,
                    trainer_state: dict, save_policy=None, total_limit: int | None = None) -> Path:
    """Write checkpoint-<step> atomically; `save_policy(dir)` writes the user-facing model."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=root))
    try:
        torch.save(trainable, tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(trainer_state, f, indent=1, default=_json_default)
        if save_policy is not None:
            save_policy(tmp / "policy")
        if final.exists():  # the same step written again (a rerun): replace it, still atomically
            old = Path(tempfile.mkdtemp(prefix=f".old-checkpoint-{step}-", dir=root))
            os.replace(final, old / "c")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if total_limit is not None:
        for old in list_checkpoints(root)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under output_dir, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike, *, map_location=None) -> dict:
    """{'trainable', 'optimizer', 'scheduler', 'rng', 'state'} of a checkpoint directory."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"alignfast: {path} is not a complete checkpoint (no {STATE_FILE})")
    with open(path / STATE_FILE) as f:
        state = json.load(f)
    return {
        "trainable": torch.load(path / "trainable.pt", map_location=map_location, weights_only=True),
        "optimizer": torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True),
        "scheduler": torch.load(path / "scheduler.pt", map_location=map_location, weights_only=False),
        "rng": torch.load(path / "rng.pt", weights_only=False),
        "state": state,
    }


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
