"""A progress bar for PPO runs, as a trainer callback (transformers TrainerCallback style)."""

from __future__ import annotations

import os
import sys


class ProgressCallback:
    """tqdm bar over PPO steps showing the latest mean score and KL; silent when stderr is not a TTY
    unless `always` is set (CI logs get one line per logging step instead of redraws)."""

    def __init__(self, desc: str = "PPO", *, always: bool = False, position: int = 0):
        self.desc = desc
        self.always = always
        self.position = position
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step",
                        position=self.position, leave=True, file=sys.stderr,
                        disable=not (self.always or sys.stderr.isatty()) or not _main_process(), dynamic_ncols=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            shown = {}
            if "objective/scores" in logs:
                shown["score"] = f"{logs['objective/scores']:.3f}"
            if "objective/kl" in logs:
                shown["kl"] = f"{logs['objective/kl']:.3f}"
            self.bar.set_postfix(shown, refresh=False)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _main_process() -> bool:
    """Under a launcher (torchrun, accelerate launch) only the main process draws the bar."""
    return os.environ.get("RANK", "0") == "0"
