"""The run loop every trainer on this engine shares, whatever one step is (a PPO step of Align-Pro, the Oracle
arm or Proxy-RLHF; an SFT step of the Aligner):

    claim output_dir (or resume: verified checkpoint, stale temporaries removed)
    for step in [global_step, num_steps):
        metrics, samples = _train_step(step)           metrics.jsonl (every step), samples.jsonl, callbacks
        log every logging_steps; evaluate when _eval_due; checkpoint every save_steps, at the end, and when a
        callback or SIGTERM/SIGINT asks to stop; after a signal: raise TrainingInterrupted with the
        checkpoint that resumes the run

Under N processes (accelerate) every process runs the loop; metrics, samples, config.json and checkpoints
are global and written once, by the main process, and no process passes a checkpoint another is writing.

A trainer provides: config (output_dir, overwrite_output_dir, report_to, run_name, logging_steps,
save_strategy, save_steps), processes, callbacks, history, global_step, num_steps and the methods
_train_step, _save_checkpoint, _load_checkpoint, evaluate, _eval_due, _epoch and _log_line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from alignfast.eval.report_files import reports_describing
from alignfast.files import write_text_atomically
from alignfast.ops._checks import fail
from alignfast.trainer import checkpoint as ckpt
from alignfast.trainer.metrics_logger import MetricsLogger
from alignfast.trainer.output_lock import lock_output_dir
from alignfast.trainer.results import TrainOutput
from alignfast.trainer.stop_signals import StopSignals, stopped_at_once, stopped_by_signal

_log = logging.getLogger("alignfast.trainer")


@contextlib.contextmanager
def _warnings_on_main_process_only(is_main: bool):
    """Within the block, a process other than the main one logs errors only (logging.disable: process-wide, for the
    block's duration). For what every process computes alike, whose warnings the main process gives once."""
    if is_main:
        yield
        return
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


class RunLoop:
    """Mixin: train() and the output-directory rule of every trainer (see the module docstring)."""

    def train(self, resume_from_checkpoint=None) -> TrainOutput:
        """Run to the configured number of steps; resume_from_checkpoint: a checkpoint dir, or True for the
        latest one in output_dir (the run then continues exactly as if uninterrupted)."""
        cfg = self.config
        resumed = None
        self._take_output_dir(resume_from_checkpoint)  # the other processes start once the main one has claimed it
        if resume_from_checkpoint:
            # Every process verifies and loads, and would say each warning of it (another step count, a skipped
            # damaged checkpoint, other data) N times: the main process says them.
            with _warnings_on_main_process_only(self.processes.is_main):
                # verified, past damaged ones; the same on every process
                path = self._agreed_resume_point(resume_from_checkpoint)
                self._load_checkpoint(path)
            resumed = path
            # only once it loaded: a resume that fails (a typo, a checkpoint of another setup) leaves the run as it was
            self._on_main_process(lambda: self._abandon_later_checkpoints(path))
        # Metrics, samples and the run's config are global and written once, by the main process; the config first,
        # so that a run that cannot write it (a folder in its place) leaves no fresh metrics file behind.
        if self.processes.is_main:
            write_text_atomically(Path(cfg.output_dir) / "config.json", cfg.to_json())
        logger = MetricsLogger(cfg.output_dir, cfg.report_to, run_name=cfg.run_name, config=cfg.to_dict()) \
            if self.processes.is_main else _SilentLogger()
        logger.restart(self.history, step=self.global_step)
        if self.processes.is_main and resumed is None and logger.samples_path.exists():
            logger.samples_path.unlink()
        state = self.callbacks.state
        state.max_steps = self.num_steps
        state.global_step = self.global_step
        control = self.callbacks.fire("on_train_begin")
        # A callback's stop request (control.should_training_stop) is agreed over the processes like a signal: a
        # callback that decides per process (on its wall-clock time, its own metrics) would otherwise stop one
        # process while the others go on into the next step's collectives and wait for it forever.
        stopping = self._agree_on_stop(control)
        last_good = resumed
        metrics: dict = self.history[-1] if self.history else {}
        # SIGTERM/SIGINT: finish the step, checkpoint, stop (trainer/stop_signals.py). A second one stops at once,
        # naming the last checkpoint: at_once reads last_good and global_step when it comes (a closure over them).
        # StopSignals' own texts say a checkpoint is written; without one they say so.
        no_checkpoint = {} if cfg.save_strategy == "steps" else dict(
            finishing="the current step, then stopping (no checkpoint: save_strategy is 'no')", again="stop at once")
        stop = StopSignals(**no_checkpoint, at_once=lambda signum: stopped_at_once(
            signum, self.global_step, self.num_steps, last_good, how="train(resume_from_checkpoint=True)")).__enter__()
        try:
            while self.global_step < self.num_steps and not stopping:
                step = self.global_step
                metrics, samples = self._train_step(step, last_good)
                self.global_step = step + 1
                self.history.append({"step": self.global_step, **metrics})
                logger.write(metrics, step=self.global_step)
                state.global_step = self.global_step
                state.epoch = self._epoch(metrics)
                final = self.global_step == self.num_steps
                if self.global_step % cfg.logging_steps == 0 or final:
                    logger.track(metrics, step=self.global_step)
                    logger.samples(samples[: getattr(cfg, "num_logged_samples", 0)], step=self.global_step)
                    state.log_history.append({"step": self.global_step, **metrics})
                    if self.processes.is_main:
                        _log.info("step %d/%d  %s  %.2fs", self.global_step, self.num_steps, self._log_line(metrics),
                                  metrics["timing_s/step"])
                    control = self.callbacks.fire("on_log", logs=metrics)
                if self._eval_due(final):
                    eval_metrics = self.evaluate()
                    logger.write(eval_metrics, step=self.global_step)
                    logger.track(eval_metrics, step=self.global_step)
                    self.history[-1].update(eval_metrics)
                    metrics = {**metrics, **eval_metrics}
                    control = self.callbacks.fire("on_evaluate", metrics=eval_metrics)
                control = self.callbacks.fire("on_step_end")
                # A stop signal may reach some processes only (a scheduler that signals one node, a kill of one
                # worker) or reach them between steps at different times: the processes agree once per step, or
                # the signalled one would wait in the checkpoint's barrier while the others ran into the next step.
                # Only the agreed value decides this step: a signal that arrives during the agreement or the save
                # below is in the next step's agreement (acting on it here would be one process alone again).
                # The callbacks' requests ride along in the low bit: max over processes keeps any request (a signal
                # number, doubled, dominates; it stops the run anyway).
                agreed = self.processes.max_int(2 * (stop.received or 0) + int(bool(control.should_training_stop)))
                signal_number, stopping = agreed // 2, agreed > 0
                control.should_training_stop = control.should_training_stop or stopping
                stop.adopt(signal_number)
                if cfg.save_strategy == "steps" and (self.global_step % cfg.save_steps == 0 or final or stopping):
                    with ckpt.writing(cfg.output_dir, f"checkpoint-{self.global_step}"):
                        last_good = self._save_checkpoint()
                    control = self.callbacks.fire("on_save")
                    stopping = self._agree_on_stop(control) or stopping  # every process saves here: one more agreement
                if signal_number and not final:
                    raise stopped_by_signal(stop, self.global_step, self.num_steps, last_good)
        finally:
            stop.restore()
            logger.close()
        self.callbacks.fire("on_train_end")
        return TrainOutput(global_step=self.global_step, metrics=metrics, history=list(self.history))

    def _agree_on_stop(self, control) -> bool:
        """Whether any process's callbacks asked to stop (a collective; the local request for one process). The
        agreed answer is written back, so every process's callbacks see the same control from here on."""
        stopping = bool(self.processes.max_int(int(bool(control.should_training_stop))))
        control.should_training_stop = stopping
        return stopping

    def _take_output_dir(self, resume) -> None:
        """The main process locks output_dir for the run (trainer/output_lock.py: a second run into it is refused),
        removes what a killed writer left there, and claims it for a fresh run or a resume from another run's
        checkpoint. Only then do the other processes go on (one agreement: an error of the main process stops
        them all, none waits for it in a barrier); only the main process cleans, so no two processes restore the
        same replaced checkpoint."""
        cfg = self.config

        def claim():
            self._output_lock = lock_output_dir(cfg.output_dir)  # held while this trainer lives (save_model too)
            for name in ckpt.clean_stale(cfg.output_dir):  # what a killed writer left (gigabytes with real models)
                _log.warning("removed %s, a checkpoint a killed run did not finish writing",
                             Path(cfg.output_dir) / name)
            if not resume or not ckpt.belongs_to(resume, cfg.output_dir):
                self._claim_output_dir(resume=resume)

        self._on_main_process(claim)

    def _save_model_folder(self, output_dir, what: str, prepare) -> Path:
        """Save the trained model into `output_dir` (by default the run's output_dir/final, where the CLI saves it),
        which appears whole or not at all; an existing one is replaced whole (checkpoint.new_folder_atomically: a kill
        mid-write leaves the earlier model as it was; files of the earlier folder the new model does not write are
        kept aside, with a warning). A run's output_dir, a folder containing it, the working or home folder and a
        folder of files that are no saved model are refused in one line (checkpoint.check_model_folder: the swap
        would move them aside whole). prepare(), on every process after that check (so none waits in a collective
        for one that refused): what the save needs of every process (a sharded model's gather), returning
        write(folder), which the main process alone runs (the replicas are identical). `what`: for write errors."""
        out = Path(output_dir) if output_dir is not None else Path(self.config.output_dir) / "final"
        # SIGTERM/SIGINT during the save, all of it (prepare()'s collectives too): a first signal does not interrupt
        # it (the model is the run's result) and is delivered once the save is whole, below; a second one stops it
        # at once and raises StoppedAtOnce naming what is left: `out` as it was (the write is atomic), the last
        # checkpoint. Every process defers alike until the save is done, so none leaves the others in a collective.
        kept, last = os.path.lexists(out), ckpt.latest_checkpoint(self.config.output_dir)
        with StopSignals(f"the save of {out} first", "stop at once; the folder then stays as it was",
                         at_once=lambda signum: stopped_at_once(
                             signum, self.global_step, self.num_steps, last, folder=out, folder_kept=kept,
                             how="train(resume_from_checkpoint=True) then save_model()")) as stop:
            ckpt.check_model_folder(out, self.config.output_dir)
            write = prepare()
            if self.processes.is_main:
                with ckpt.writing(self.config.output_dir, what, out), ckpt.new_folder_atomically(out) as tmp:
                    write(tmp)
            self.processes.wait()
        if stop.requested:  # delivered now, to the handler in place before the save: the caller stops as it would
            # have (`alignfast demo` trains further arms after a save; a command ends), with the model whole
            _log.warning("alignfast: %s was received during the save of %s: the save completed first; %s takes "
                         "effect now", stop.name, out, stop.name)
            signal.raise_signal(stop.received)
        return out

    def _on_main_process(self, work) -> None:
        """work() on the main process alone, then one agreement: if it raised (anything: an OSError too), every
        process stops, the main one with its error and the others with a line pointing to it; none waits in a
        collective for a process that has already failed."""
        self.processes.agreed(work if self.processes.is_main else lambda: None)

    def _abandon_later_checkpoints(self, resume) -> None:
        """A resume from an earlier checkpoint of output_dir's own run starts another branch of it. The old
        branch's later checkpoints would stay beside the new ones, and a later plain --resume would continue them
        (metrics.jsonl going back to their history). They are moved aside, into abandoned-after-<checkpoint>-<time>/
        of output_dir, where nothing of alignfast looks for checkpoints: kept, not deleted, and said."""
        later = ckpt.checkpoints_after(resume, self.config.output_dir)
        if not later:
            return
        aside = Path(self.config.output_dir) / f"abandoned-after-{Path(resume).name}-{time.strftime('%Y%m%d-%H%M%S')}"
        while True:  # two branches from one checkpoint within a second get two folders
            try:
                aside.mkdir()
                break
            except FileExistsError:
                aside = aside.with_name(aside.name + "-1")
        for p in later:
            p.rename(aside / p.name)
        _log.warning("resuming from %s, an earlier checkpoint: the later %s of the run it branches from were moved "
                     "to %s", Path(resume).name, ", ".join(p.name for p in later), aside)

    def _agreed_resume_point(self, requested):
        """ckpt.resume_point, the same on every process. Each verifies the checkpoints itself: one that finds the
        newest damaged (its own read of a node-local or flaky disk) would fall back to an earlier step alone, its
        warning muted off the main process, and one that finds none whole would fail alone while the others went
        on. So the processes agree: all raise when any failed (Processes.agreed), and all stop in one line when
        their steps differ."""
        procs = self.processes
        path = procs.agreed(ckpt.resume_point, self.config.output_dir, requested)
        if not procs.distributed:
            return path
        steps = procs.gather_objects([ckpt.step_of(path)])
        newest, oldest = max(steps), min(steps)
        if newest != oldest:
            fail("resume_from_checkpoint", f"the processes chose different checkpoints to resume from (steps "
                 f"{oldest} to {newest}; this one {Path(path).name}): one of them found a checkpoint damaged that "
                 "another read whole; check the file system, or resume from one checkpoint by its path")
        return path

    def _claim_output_dir(self, resume=None) -> None:
        """A fresh run must not mix with an earlier one in the same output_dir: its metrics.jsonl would be
        overwritten, `resume` would pick the earlier run's later checkpoints, and save_total_limit would
        delete this run's checkpoints as the oldest. So: an error, or with overwrite_output_dir, a clean slate."""
        cfg = self.config
        out = Path(cfg.output_dir)
        if self.global_step > 0:  # this trainer's own run, continued by a second train() call
            return
        found = check_output_dir(cfg, resume=resume)
        if not found:
            return
        # Its final model and the eval reports of it go too: the earlier run's model must not outlive it as this
        # run's final/ (save_model would replace it only at the end: a run stopped before then would leave it),
        # and eval.json would describe a model that is gone. Other arms' runs in subfolders (oracle/, proxy/) have
        # their own output_dir and stay.
        # The reports `alignfast eval` left in the parent folder go as well when they evaluated a checkpoint of this
        # run as a second arm (eval --checkpoint run/final --oracle-checkpoint run/oracle/final writes run/eval.json).
        stale = [out / "final"] * (out / "final").exists() + reports_describing(out)
        _log.warning("overwrite_output_dir: deleting the earlier run's %s in %s%s", ", ".join(found), out,
                     "".join(f", and {p}" for p in stale))
        for p in ckpt.list_checkpoints(out) + sorted(out.glob(".tmp-checkpoint-*")):  # with what a crash left
            shutil.rmtree(p, ignore_errors=True)
        for p in [out / "metrics.jsonl", out / "samples.jsonl", *stale]:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


class _SilentLogger:
    """The metrics logger of a process other than the main one: metrics are global and written once."""

    def restart(self, history, *, step):
        pass

    def write(self, metrics, *, step):
        pass

    track = write

    def samples(self, rows, *, step):
        pass

    def close(self):
        pass


def check_output_dir(config, resume=None) -> list[str]:
    """What of an earlier run config.output_dir holds (its checkpoints, a non-empty metrics.jsonl); an error
    naming the ways out when there is any and overwrite_output_dir is off. Cheap, so a command can call it
    before loading any model. `resume`: the run's resume request; a resume of output_dir's own run (True, or
    one of its checkpoints) finds nothing, a resume from another run's checkpoint must not mix with a run the
    folder holds (its metrics.jsonl and final/ would be replaced, its later checkpoints kept)."""
    out = Path(config.output_dir)
    if resume and ckpt.belongs_to(resume, out):
        return []
    metrics = out / "metrics.jsonl"
    checkpoints = [p.name for p in ckpt.list_checkpoints(out)]
    found = checkpoints + ([metrics.name] if metrics.is_file() and metrics.stat().st_size else [])
    if found and not config.overwrite_output_dir:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        replace = "replace it with overwrite_output_dir (--trainer.overwrite_output_dir true)"
        if resume:
            fail("output_dir", f"'{out}' holds another run ({shown}) and {resume} is not one of its checkpoints: "
                 f"resuming into it would mix the two runs; choose another output_dir, or {replace}")
        if not checkpoints:  # stopped before its first checkpoint, or saved none (save_strategy "no")
            fail("output_dir", f"'{out}' holds a run with no checkpoint ({shown}), so there is "
                 f"nothing to resume: {replace}, or choose another output_dir")
        fail("output_dir", f"'{out}' already holds a run ({shown}): resume it (the command that wrote it with "
             f"--resume; resume_from_checkpoint=True in Python), choose another output_dir, or {replace}")
    return found
