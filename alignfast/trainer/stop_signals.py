"""SIGTERM / SIGINT during training: finish the step, write a checkpoint, stop with a line saying how to resume.

Schedulers (Slurm, Kubernetes, systemd) send SIGTERM before they kill a job, and Ctrl-C sends SIGINT. Without
a handler either one ends the process at once and loses every step since the last checkpoint. With
`StopSignals` installed around the training loop:

    first signal   -> the current PPO step finishes, a checkpoint is written, TrainingInterrupted is raised
    second signal  -> the step is abandoned at once (StoppedAtOnce, naming the last checkpoint); that checkpoint
                      stays as it was

and around the save of the final model (RunLoop._save_model_folder, after train() returned):

    first signal   -> the save finishes (the model is the run's result), a warning says so, nothing is raised
    second signal  -> the save is abandoned at once (StoppedAtOnce); the folder stays as it was (written atomically)

Both exceptions are KeyboardInterrupts carrying exit_code 128 + the signal's number and the one line the CLI prints.

Under a launcher (torchrun, accelerate launch) every process stops after the same step: the run
loop takes the largest signal number over the processes once per step (StopSignals.adopt), so a signal that
reached one process stops them all. And a worker often gets the same signal twice at once: from the scheduler,
which signals every process of the job (Slurm, systemd's control group), and from the launcher, which forwards
it. The same signal again within DUPLICATE_WINDOW_S of the first is taken for that copy, not for "stop now".

Handlers can only be installed from the main thread; elsewhere (a trainer run in a worker thread) the
process keeps its own handlers and nothing changes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

_log = logging.getLogger("alignfast.trainer")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
DUPLICATE_WINDOW_S = 3.0  # a launcher forwards a signal within milliseconds; a user's second Ctrl-C comes later


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGTERM/SIGINT after a step; `checkpoint` is where to resume from (None when
    save_strategy is 'no'), `signal_name` the signal, `exit_code` 128 + its number (the shell's convention)."""

    def __init__(self, *, step: int, num_steps: int, checkpoint, signal_name: str, exit_code: int,
                 how: str = "train(resume_from_checkpoint=True)"):
        self.step, self.num_steps, self.checkpoint = step, num_steps, checkpoint
        self.signal_name, self.exit_code = signal_name, exit_code
        super().__init__(f"alignfast: {self.line(how)}")  # the Python API's message; the CLI asks line() its own way

    def __str__(self) -> str:
        return self.args[0] if self.args else ""

    def line(self, how: str) -> str:
        """The one line for the user, `how` naming the way to continue (the CLI: 'the same command with --resume')."""
        return stop_line(self.signal_name, self.step, self.num_steps, self.checkpoint, how=how)


class StoppedAtOnce(TrainingInterrupted):
    """A second SIGTERM/SIGINT: what was running stopped at once. `checkpoint`: the last one written (None: none),
    which the run continues from; `folder`: the model folder whose save was abandoned (None: a training step
    was), left as it was: `folder_kept` says whether it held an earlier model."""

    def __init__(self, *, folder=None, folder_kept: bool = False, **kwargs):
        self.folder, self.folder_kept = folder, folder_kept  # before the message, which names them
        super().__init__(**kwargs)

    def line(self, how: str) -> str:
        return stop_line(self.signal_name, self.step, self.num_steps, self.checkpoint, how=how, twice=True,
                         folder=self.folder, folder_kept=self.folder_kept)


class StopSignals:
    """Installs the handlers on enter (main thread only) and restores the previous ones on exit.

    `finishing`: what a first signal lets finish, for its log line ("SIGTERM received: finishing <finishing> (send
    it again to <again>)"). `at_once(signum)`: the exception a second signal raises (StoppedAtOnce, built when it
    comes, so it names the checkpoint of that moment). Within another StopSignals (a model saved by a callback
    during a training step) nothing is installed: the outer one's handling covers the step, the save included."""

    def __init__(self, finishing: str = "the current step, then writing a checkpoint and stopping",
                 again: str = "stop at once without a checkpoint", at_once=None):
        self.finishing, self.again, self._at_once = finishing, again, at_once
        self.received: int | None = None
        self._received_at = 0.0
        self._previous: dict = {}
        # under torchrun / accelerate launch (which set LOCAL_RANK), even for one process: it forwards signals too
        self._launched = "LOCAL_RANK" in os.environ

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                if getattr(signal.getsignal(s), "__func__", None) is StopSignals._handle:
                    continue  # an outer StopSignals handles it
                try:
                    self._previous[s] = signal.signal(s, self._handle)
                except (ValueError, OSError):  # not allowed here (an embedded interpreter): leave it
                    pass
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def adopt(self, signum: int) -> None:
        """Stop after this step because another process received `signum` (0: none did)."""
        if signum and self.received is None:
            self.received = signum
            self._received_at = time.monotonic()
            _log.warning("alignfast: %s received by another process: finishing %s", signal.Signals(signum).name,
                         self.finishing)

    def _handle(self, signum, _frame) -> None:
        if self.received is not None and self._launched and signum == self.received and \
                time.monotonic() - self._received_at < DUPLICATE_WINDOW_S:
            return  # the same signal from the launcher and from the scheduler: one request
        if self.received is not None:  # the second one: stop now
            self.restore()
            if self._at_once is not None:
                raise self._at_once(signum)
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice: stopped at once")
        self.received = signum
        self._received_at = time.monotonic()
        _log.warning("alignfast: %s received: finishing %s (send it again to %s)", signal.Signals(signum).name,
                     self.finishing, self.again)


def stopped_by_signal(stop: StopSignals, step: int, num_steps: int, checkpoint) -> TrainingInterrupted:
    """The exception (and the one line the CLI prints) for a run stopped by `stop`'s signal after `step`."""
    return TrainingInterrupted(step=step, num_steps=num_steps, checkpoint=checkpoint, signal_name=stop.name,
                               exit_code=128 + int(stop.received))


def stopped_at_once(signum: int, step: int, num_steps: int, checkpoint, *, how: str, folder=None,
                    folder_kept: bool = False) -> StoppedAtOnce:
    """The exception (and the one line) for a second signal: during a training step (after `step` of `num_steps`;
    `checkpoint` the last one written), or during the save of the model `folder`."""
    return StoppedAtOnce(step=step, num_steps=num_steps, checkpoint=checkpoint, signal_name=signal.Signals(signum).name,
                         exit_code=128 + int(signum), how=how, folder=folder, folder_kept=folder_kept)


def stop_line(signal_name: str, step: int, num_steps: int, checkpoint, *, how: str, twice: bool = False,
              folder=None, folder_kept: bool = False) -> str:
    """'stopped by SIGTERM after step 3 of 10; checkpoint <path> written; <how> continues the run'. twice: a second
    signal stopped the step in progress at once (`checkpoint`: the last one written), or the save of `folder`."""
    if twice and folder is not None:
        left = "keeps the earlier model" if folder_kept else "was not written"
        where = f"{how} continues from {checkpoint} and writes it again" if checkpoint is not None else \
            "no checkpoint was written, so the run cannot be resumed: this model is lost"
        return (f"stopped at once by {signal_name} received twice, during the save of {folder} after step {step} of "
                f"{num_steps}: {folder} {left}; {where}")
    if twice:
        where = f"the last checkpoint is {checkpoint}: {how} continues the run from it" if checkpoint is not None \
            else "no checkpoint was written: the run cannot be resumed"
        return f"stopped at once by {signal_name} received twice, after step {step} of {num_steps}; {where}"
    if checkpoint is not None and str(checkpoint).endswith(f"checkpoint-{step}"):
        where = f"checkpoint {checkpoint} written; {how} continues the run"
    elif checkpoint is not None:
        where = f"no checkpoint of this step (save_strategy is 'no'); {how} continues from {checkpoint}"
    else:
        where = "no checkpoint written (save_strategy is 'no'): the run cannot be resumed"
    return f"stopped by {signal_name} after step {step} of {num_steps}; {where}"
