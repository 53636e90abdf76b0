"""Where the metrics go: output_dir/metrics.jsonl always (one line per step), TensorBoard and W&B when asked.

samples.jsonl gets a few rollouts (prompt, policy output, answer, score) at each logging step, so a
run can be read, not only plotted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from alignfast.files import write_text_atomically
from alignfast.ops._checks import fail
from alignfast.trainer.checkpoint import writing

TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # torch.utils.tensorboard needs the first


def check_reporters(report_to: list[str]) -> list[str]:
    """The trackers to open: each one named and installed, or every installed one for 'all'. Naming one
    that is not installed is an error naming report_to."""
    import importlib.util

    wanted = set(report_to)
    out = []
    for name, module in TRACKER_MODULES.items():
        if name not in wanted and "all" not in wanted:
            continue
        try:
            installed = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            installed = False
        if installed:
            out.append(name)
        elif name in wanted:
            fail("report_to", f"asks for {name}, which is not installed (pip install {name})")
    return out


class MetricsLogger:
    def __init__(self, output_dir: str, report_to: list[str], *, run_name: str | None = None,
                 config: dict | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.samples_path = self.dir / "samples.jsonl"
        self.trackers = check_reporters(report_to)
        self._tb = None
        self._wandb = None
        if "tensorboard" in self.trackers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dir / "runs" / (run_name or "alignfast")))
        if "wandb" in self.trackers:
            import wandb

            self._wandb = wandb.init(name=run_name, config=config, reinit=True)

    def restart(self, history: list[dict], *, step: int) -> None:
        """Rewrite metrics.jsonl to exactly `history` and keep the samples.jsonl rows of steps <= `step` (on
        resume: drop what the interrupted run wrote past its checkpoint; those steps run again)."""
        with writing(self.dir, self.metrics_path.name):
            write_text_atomically(self.metrics_path, "".join(json.dumps(_clean(line)) + "\n" for row in history
                                                             for line in _lines(row)))
        if self.samples_path.exists():
            lines = self.samples_path.read_text().splitlines()
            kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
            if len(kept) != len(lines):
                write_text_atomically(self.samples_path, "".join(line + "\n" for line in kept))

    def write(self, metrics: dict, *, step: int) -> None:
        with writing(self.dir, self.metrics_path.name), open(self.metrics_path, "a") as f:
            f.write(json.dumps(_clean({"step": step, **metrics})) + "\n")

    def track(self, metrics: dict, *, step: int) -> None:
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def samples(self, rows: list[dict], *, step: int) -> None:
        if not rows:
            return
        with writing(self.dir, self.samples_path.name), open(self.samples_path, "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _lines(row: dict) -> list[dict]:
    """The metrics.jsonl lines of one history row, as the run wrote them: the step's metrics, then, when it
    evaluated, its eval/ metrics on a line of their own (history holds them merged into the step's row)."""
    evals = {k: v for k, v in row.items() if k.startswith("eval/")}
    if not evals:
        return [row]
    return [{k: v for k, v in row.items() if not k.startswith("eval/")}, {"step": row["step"], **evals}]


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a line cut short by a crash
        return None


def _clean(row: dict) -> dict:
    """JSON has no NaN/inf: write them as strings so the file stays valid."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
