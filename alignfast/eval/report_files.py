"""The files `alignfast eval` writes, and which of them describe a given run.

Without --output-dir, eval writes beside its first checkpoint: `eval --checkpoint run/final --oracle-checkpoint
run/oracle/final` puts run/eval.json there, and it describes the Oracle run in run/oracle too. When a run's
output_dir is replaced (overwrite_output_dir), every report of its checkpoints must go with them, or a table
would quote a model that no longer exists.
"""

from __future__ import annotations

import json
from pathlib import Path

REPORT_FILES = ("eval.json", "eval.md", "eval_rollouts.jsonl")
# eval.json's keys for the checkpoints it evaluated (alignfast/cli/eval_checks.recorded_checkpoints)
CHECKPOINT_KEYS = ("checkpoint", "oracle_checkpoint", "aligner_checkpoint", "aligner_ppo_checkpoint",
                   "proxy_checkpoint")


def as_recorded(path: str | None) -> str | None:
    """A checkpoint as eval.json records it: absolute, so a later reader need not know eval's working folder."""
    return None if path is None else str(Path(path).expanduser().resolve())


def reports_describing(run_dir: Path) -> list[Path]:
    """The eval reports of checkpoints inside run_dir: run_dir's own, and its parent's when the parent's eval.json
    evaluated a checkpoint inside run_dir (a relative path recorded by an older alignfast is read from here)."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in REPORT_FILES if (run_dir / name).exists()]
    parent = run_dir.parent
    try:
        recorded = json.loads((parent / "eval.json").read_text())
    except (OSError, ValueError):
        return found
    inside = Path(run_dir).expanduser().resolve()
    for key in CHECKPOINT_KEYS:
        value = recorded.get(key) if isinstance(recorded, dict) else None
        if isinstance(value, str) and Path(value).expanduser().resolve().is_relative_to(inside):
            return found + [parent / name for name in REPORT_FILES if (parent / name).exists()]
    return found
