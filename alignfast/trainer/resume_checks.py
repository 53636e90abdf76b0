"""Does a checkpoint belong to this run? Checked before any tensor is copied, so that resuming with another
model or another value head ends in one line naming the checkpoint and the difference (not a shape error from
deep inside torch, and never a silently half-restored run)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from alignfast.ops._checks import AlignfastArgumentError


_log = logging.getLogger("alignfast.trainer")


class CheckpointMismatchError(AlignfastArgumentError):
    """The checkpoint was written by a run with another model, value head or trainable set."""


def _fail(path: Path, message: str):
    raise CheckpointMismatchError(f"alignfast: cannot resume from {path}: {message}; resume with the run's own "
                                  "settings, or start a new run in another output_dir")


def check_resume_matches(path, trainable: dict, state: dict, model, config, *, value_model, value_head,
                         label: str = "policy", shape_hint: str = "another model, or another LoRA rank?") -> None:
    """The checkpoint's trained tensors are exactly this run's trainable ones, shapes included. `label` names the
    trained model in the messages (the Aligner's is the corrector); `shape_hint`, the likely causes of a shape that
    differs (a proxy's come from its target and proxy_hidden_size, not from LoRA)."""
    path = Path(path)
    saved_cfg = state.get("config") or {}
    if (value_model is not None and "value_model" not in trainable) or \
            (value_head is not None and "value_head" not in trainable):
        _fail(path, f"it was written with value_head={saved_cfg.get('value_head')!r} and this run has "
                    f"value_head={config.value_head!r}")
    params = dict(model.named_parameters())
    saved = trainable.get("policy") or {}
    unknown = [n for n in saved if n not in params]
    if unknown:
        _fail(path, f"it holds {label} parameter {unknown[0]!r}, which this {label} does not have (was it written "
                    "for another model, or with/without LoRA or other LoRA target_modules?)")
    for name, value in saved.items():
        if tuple(value.shape) != tuple(params[name].shape):
            _fail(path, f"{label} parameter {name!r} has shape {tuple(value.shape)} there and "
                        f"{tuple(params[name].shape)} in this {label} ({shape_hint})")
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    if missing:
        _fail(path, f"it does not hold trainable {label} parameter {missing[0]!r} (written for another model, or "
                    "with/without LoRA or other LoRA target_modules?)")
    for label, module, key in (("value model", value_model, "value_model"), ("value head", value_head, "value_head")):
        if module is None:
            continue
        own = module.state_dict()
        absent = [n for n in own if n not in trainable[key]]
        if absent:
            _fail(path, f"its {label} lacks {absent[0]!r}, which this run's {label} has (another model?)")
        for name, value in trainable[key].items():
            if name not in own:
                _fail(path, f"its {label} has {name!r}, which this run's {label} does not (another model?)")
            if tuple(value.shape) != tuple(own[name].shape):
                _fail(path, f"its {label}'s {name!r} has shape {tuple(value.shape)} there and "
                            f"{tuple(own[name].shape)} here (another model?)")


def reference_fingerprint(named_tensors) -> str:
    """A cheap identity of the frozen reference weights (the SFT policy the KL is taken to): name, shape, dtype
    and the first and last 16 values of each. A resume from the same prompter reproduces it; another model,
    even of the same architecture, does not. (Hashing every byte would cost seconds per gigabyte.)"""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in named_tensors:
        flat = t.detach().reshape(-1)
        ends = torch.cat([flat[:16], flat[-16:]]).to("cpu", torch.float64)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(ends.numpy().tobytes())
    return h.hexdigest()[:16]


# How each arm's checkpoints are resumed from the command line, for the error that names a mix-up.
RESUMED_BY = {"align_pro": "`alignfast train --resume`", "oracle": "`alignfast train --oracle --resume`",
              "proxy": "`alignfast train --method proxy --resume`", "aligner": "`alignfast aligner train --resume`"}


def check_same_arm(path, state: dict, arm: str) -> None:
    """First of all: another arm's checkpoint would otherwise fail on whichever of its settings differs first
    (a Proxy-RLHF checkpoint given to Align-Pro read "value_head='separate' ... this run has 'separate'")."""
    saved_arm = state.get("arm")
    if saved_arm is not None and saved_arm != arm:
        how = f" (it resumes with {RESUMED_BY[saved_arm]})" if saved_arm in RESUMED_BY else ""
        _fail(Path(path), f"it was written by the {saved_arm!r} arm and this is the {arm!r} arm{how}")


def check_same_reference(path, state: dict, fingerprint: str, arm: str, *,
                         weights: str = "its reference (SFT) weights differ from this run's policy before "
                                        "training") -> None:
    """The frozen weights the run was trained from (reference_fingerprint) are this run's; `weights` says which they
    are, for the message. The fingerprint holds each tensor's dtype, so the same model loaded in another dtype
    differs too (its values are other numbers: a resume would not continue the same run), and the message says so."""
    path = Path(path)
    check_same_arm(path, state, arm)
    saved = state.get("reference_fingerprint")
    if saved is not None and saved != fingerprint:
        _fail(path, f"it was trained from other frozen weights: {weights} (another model of the same architecture, or "
                    "this one loaded in another dtype?)")


def check_num_steps(path, state: dict, num_steps: int, lr_scheduler_type) -> bool:
    """A resume may run longer or shorter (total_episodes, max_steps, num_train_epochs), but the LR schedule is
    rebuilt over the new number of steps (a scheduler's state holds its step, not its length): the learning rate
    then jumps at the resume. Said in one warning; fewer steps than the checkpoint has run is an error. Returns
    whether the schedule is rebuilt (the caller then applies it from the first resumed step: follow_schedule)."""
    saved, done = state.get("num_steps"), int(state.get("global_step", 0))
    if saved is None or int(saved) == num_steps:
        return False
    if num_steps < done:
        _fail(Path(path), f"it is at step {done} and this run's total_episodes / max_steps / num_train_epochs give "
                          f"{num_steps} steps; resume with at least {done}")
    if str(lr_scheduler_type) != "constant":
        _log.warning("resuming from %s with %d steps where its run had %d (total_episodes / max_steps / "
                     "num_train_epochs): the %s learning-rate schedule is rebuilt over %d steps, so from step %d on "
                     "the learning rate differs from an uninterrupted run's", path, num_steps, saved,
                     lr_scheduler_type, num_steps, done + 1)
    return True


def follow_schedule(scheduler) -> None:
    """After a resume over another number of steps (check_num_steps): the learning rate of the step about to run is
    the rebuilt schedule's. The loaded optimizer holds the checkpoint run's last one (0 once a linear decay has
    ended, so the first resumed step changed nothing) and the scheduler sets the new one only after that step."""
    import warnings

    scheduler.last_epoch -= 1
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose, no step is taken
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def warn_other_train_rows(path, state: dict, rows: int, fingerprint: str, *, what: str, setting: str) -> None:
    """Other training rows may be on purpose (as other settings may), but never silent: the data order is drawn over
    the rows, so the run will not match an uninterrupted one. `what`: the rows' name; `setting`: where they are set.
    A checkpoint that recorded nothing (an older alignfast) is not compared."""
    saved = state.get("train_rows")
    if saved is not None and saved != rows:
        _log.warning("resuming from %s with %d %s where the checkpoint's run had %d (%s): the data order and the run "
                     "will not match an uninterrupted one", path, rows, what, saved, setting)
    elif state.get("train_fingerprint") not in (None, fingerprint):
        _log.warning("resuming from %s with other %s than the checkpoint's run (as many, %d, but other rows, order "
                     "or tokenization; %s): the run will not match an uninterrupted one", path, what, rows, setting)


def warn_other_inputs(path, state: dict, *, target: dict | None, rewards: list | None,
                      reward_models: dict | None = None, environment: dict | None = None,
                      changes_said: Sequence[str] = ()) -> None:
    """One warning line for a target, one for a reward setup, one for reward models' weights, one for the
    environment, that differ from those the checkpoint's run had (recorded by its trainer: target {name, weights},
    rewards [[name, weight], ...], reward_models {name: fingerprint of its weights}, environment {"environment":
    class name, "environment_settings": its describe()}); none for a checkpoint that recorded nothing. A warning, as
    for the target: another reward may be on purpose, but never silent. changes_said: the config settings whose
    change was already said: an environment setting `k` whose config setting `k` or `target_k` is among them is
    the config's (Align-Pro's environment is built from target_max_new_tokens and the others), not said twice."""
    _warn_other_environment(path, state, environment, changes_said)
    saved = state.get("target")
    if saved is not None and target is not None and saved != target:
        _log.warning("resuming from %s with another target (target.model in a run file; the target in Python): %s "
                     "where the checkpoint's run had %s: the run will not match an uninterrupted one", path,
                     _target_text(target), _target_text(saved))
    saved = state.get("rewards")
    if saved is not None and rewards is not None and [list(x) for x in saved] != [list(x) for x in rewards]:
        _log.warning("resuming from %s with another reward (reward.model / reward.functions / reward.weights in a run "
                     "file; reward_model, reward_funcs, reward_weights in Python): %s where the checkpoint's run had "
                     "%s: the run will not match an uninterrupted one", path, _rewards_text(rewards),
                     _rewards_text(saved))
    saved = state.get("reward_models")
    if isinstance(saved, dict) and reward_models:
        swapped = [name for name, fp in reward_models.items() if saved.get(name) not in (None, fp)]
        if swapped:  # same name, other weights; a name the checkpoint lacks is the reward-setup warning's
            _log.warning("resuming from %s with another reward model's weights under the same name (reward.model in a "
                         "run file; reward_model in Python): %s differ from the checkpoint's run's: the run will not "
                         "match an uninterrupted one", path, ", ".join(repr(n) for n in swapped))


def _warn_other_environment(path, state: dict, environment: dict | None, changes_said) -> None:
    """The environment's settings live outside the trainer's config for some environments (Aligner-PPO's
    correction template and draft budget, a user's own Environment), so the config comparison cannot see them."""
    if environment is None or "environment" not in state:
        return
    if state["environment"] != environment["environment"]:
        _log.warning("resuming from %s with another environment: %s where the checkpoint's run had %s: the run will "
                     "not match an uninterrupted one", path, environment["environment"], state["environment"])
        return
    saved, now = state.get("environment_settings"), environment.get("environment_settings")
    if saved is None or now is None or saved == now:
        return
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k, _MISSING) != now.get(k, _MISSING)
                     and k not in changes_said and f"target_{k}" not in changes_said)
    if not changed:
        return
    _log.warning("resuming from %s with environment settings (%s.describe()) that differ from the checkpoint's (%s): "
                 "the run will not match an uninterrupted one", path, environment["environment"],
                 "; ".join(f"{k}: {saved.get(k, _MISSING)!r} -> {now.get(k, _MISSING)!r}" for k in changed))


_MISSING = "<unset>"


def _target_text(t: dict) -> str:
    weights = t.get("weights")
    return f"{t.get('name')!r}" + (f" (weights {weights})" if weights else "")


def _rewards_text(rewards: list) -> str:
    return " + ".join(f"{w:g} x {name}" for name, w in rewards)


def prompts_fingerprint(prompts, columns: dict) -> str:
    """Identity of the training prompts and their columns, their order included (the data order is drawn over
    them)."""
    import hashlib
    import json

    h = hashlib.sha256()
    h.update(json.dumps([list(prompts), {k: list(v) for k, v in sorted(columns.items())}], default=str).encode())
    return h.hexdigest()[:16]


# reference_fingerprint of no tensor at all: what a Proxy-RLHF checkpoint recorded before its reference (the target)
# was fingerprinted; it says nothing about the run's weights.
EMPTY_FINGERPRINT = "e3b0c44298fc1c14"
