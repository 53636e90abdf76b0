"""The comparison table as Markdown (for people) and JSON (for programs)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from alignfast.eval.metrics import ArmSummary


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return f"{x:.{digits}f}"


def to_markdown(rows: Sequence[ArmSummary], *, baseline: str) -> str:
    header = ["method", "n", "mean reward", "reward variance", f"win rate vs {baseline} (95% CI)", "W / T / L"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r.win_rate is None:
            win, wtl = "—", "—"
        else:
            win = f"{_num(r.win_rate)} ({_num(r.win_rate_low)}–{_num(r.win_rate_high)})"
            wtl = f"{r.wins} / {r.ties} / {r.losses}"
        lines.append("| " + " | ".join([r.name, str(r.n), _num(r.mean), _num(r.variance), win, wtl]) + " |")
    return "\n".join(lines)


def to_json(rows: Sequence[ArmSummary], *, baseline: str, extra: dict | None = None) -> str:
    payload = {"baseline": baseline, "arms": [r.to_dict() for r in rows]}
    if extra:
        payload.update(extra)
    return json.dumps(payload, indent=2, allow_nan=True)
