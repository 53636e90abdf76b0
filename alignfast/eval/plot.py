"""Reward curves from the trainer's metrics JSONL files (one line per PPO step)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics JSONL file; a truncated last line (a run killed mid-write) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def reward_curves(runs: Mapping[str, str | Path], out_png: str | Path, *, key: str = "objective/scores",
                  x_key: str = "episode", title: str = "Reward during training",
                  baselines: Mapping[str, float] | None = None) -> Path | None:
    """Plot `key` against `x_key` for each run, with horizontal lines for fixed baselines.

    Returns the PNG path, or None (with a warning) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("alignfast: matplotlib is not installed; no reward plot written (pip install matplotlib)",
                      RuntimeWarning, stacklevel=2)
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, path in runs.items():
        recs = [r for r in read_metrics(path) if key in r and x_key in r]
        if recs:
            # a run with a few logged points gets markers: one point alone is no line, and drew nothing
            ax.plot([r[x_key] for r in recs], [r[key] for r in recs], label=label, linewidth=1.5,
                    marker="o" if len(recs) < 20 else None, markersize=3)
    for label, value in (baselines or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="gray")
        ax.annotate(label, xy=(0, value), xycoords=("axes fraction", "data"), fontsize=8, va="bottom")
    ax.set_xlabel(x_key)
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
