"""Callbacks in the transformers TrainerCallback style, as TRL users write them.

Each callback may define any of on_train_begin, on_step_end, on_log, on_evaluate, on_save and
on_train_end, called as `cb.on_x(args, state, control, **kwargs)` with args = the AlignProConfig,
state a transformers TrainerState (global_step, max_steps, log_history, ...) and control a
TrainerControl; setting control.should_training_stop = True ends the run after the current step
(a checkpoint is written first when checkpointing is on, so the run can be resumed).
"""

from __future__ import annotations

from transformers import TrainerControl, TrainerState

EVENTS = ("on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end")


class CallbackHandler:
    def __init__(self, callbacks, config):
        self.callbacks = list(callbacks or [])
        self.config = config
        self.state = TrainerState()
        self.control = TrainerControl()

    def fire(self, event: str, **kwargs) -> TrainerControl:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                result = fn(self.config, self.state, self.control, **kwargs)
                if isinstance(result, TrainerControl):
                    self.control = result
        return self.control
