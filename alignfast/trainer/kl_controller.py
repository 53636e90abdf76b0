"""The KL coefficient lambda: fixed (the paper's setting) or adaptive (Ziegler et al. 2019).

Adaptive control moves lambda so that the measured sequence KL tracks a target:

    e      = clip(KL / target - 1, -0.2, 0.2)
    lambda <- lambda * (1 + e * n / horizon)          n = episodes in the step

Both controllers expose `value`, `update(kl, n_episodes)` and a state dict for checkpoints.
"""

from __future__ import annotations


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_episodes: int) -> None:
        """A fixed coefficient ignores the measured KL."""

    def state_dict(self) -> dict:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: a fixed coefficient is the config's kl_coef, so a run resumed with another
        kl_coef uses it (as the resume warning says) instead of silently keeping the checkpoint's."""


class AdaptiveKLController:
    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_episodes: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon

    def state_dict(self) -> dict:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def make_kl_controller(config) -> FixedKLController | AdaptiveKLController:
    if config.adap_kl_ctrl:
        return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    return FixedKLController(config.kl_coef)
