"""What the trainers return and raise."""

from __future__ import annotations

from dataclasses import dataclass, field


class TrainingDivergedError(RuntimeError):
    """A NaN or inf in a reward or loss: training stopped, the last good checkpoint is untouched.

    step: the PPO step (1-based) that failed; checkpoint: the last good checkpoint (or None).
    """

    def __init__(self, message: str, *, step: int, checkpoint=None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class RolloutResult:
    """One pass of prompts through an arm, for evaluation and demos.

    rewrites: the policy's rewrite x' of each prompt (Oracle: the prompt unchanged: no rewrite);
    answers: the answer that was scored (Align-Pro: the target's first answer; Oracle: the policy's);
    all_answers: every sampled answer (target_num_samples per prompt); scores: r(x, y), averaged over
    all_answers; reward_components: each reward function's (averaged) score.
    """

    prompts: list[str]
    rewrites: list[str]
    answers: list[str]
    scores: list[float]
    all_answers: list[list[str]] = field(default_factory=list)
    reward_components: dict[str, list] = field(default_factory=dict)

    @property
    def mean_score(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else float("nan")


@dataclass
class TrainOutput:
    """global_step: PPO steps done; metrics: the last step's; history: every step's."""

    global_step: int
    metrics: dict
    history: list[dict]
