"""Evaluation in the paper's format: mean reward, reward variance and win rate of each arm
(No fine-tuning / Align-Pro / Oracle) on held-out prompts, as Markdown and JSON; reward curves."""

from alignfast.eval.metrics import ArmSummary, compare_arms, mean_and_variance, wilson_interval, win_rate
from alignfast.eval.plot import read_metrics, reward_curves
from alignfast.eval.report import to_json, to_markdown

__all__ = [
    "ArmSummary",
    "compare_arms",
    "mean_and_variance",
    "read_metrics",
    "reward_curves",
    "to_json",
    "to_markdown",
    "wilson_interval",
    "win_rate",
]
