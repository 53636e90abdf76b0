"""What `alignfast eval` checks before any model loads: that each checkpoint is of the kind its flag names, that
the run file's settings are those each policy was trained with, and that the default output folder does not hold
the evaluation of other checkpoints.

Each of these used to pass silently: an Oracle folder given as --checkpoint was scored and labelled "Align-Pro"; a
prompter evaluated with another run file's rewrite_template or response_length scored 0.325 instead of 0.517 on
the same prompts; a second evaluation of another checkpoint of one run replaced the first one's eval.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from alignfast.cli.errors import CLIError

_log = logging.getLogger("alignfast.eval")

# flag -> (the arm that must have trained it, the flag for each other arm); the "ppo" arm (PPOTrainer) is the
# Aligner (PPO corrector) where its environment is PPO_ENVIRONMENT (or not recorded: a folder saved before it was).
EXPECTED_ARM = {"--checkpoint": "align_pro", "--oracle-checkpoint": "oracle", "--aligner-ppo-checkpoint": "ppo"}
FLAG_OF_ARM = {"align_pro": "--checkpoint", "oracle": "--oracle-checkpoint", "proxy": "--proxy-checkpoint",
               "aligner": "--aligner-checkpoint", "ppo": "--aligner-ppo-checkpoint"}
PPO_ENVIRONMENT = "AlignerEnvironment"

# The settings that shape what a trained policy does at evaluation, per flag: (key in the trained run's settings,
# key of this evaluation's trainer config). The Oracle writes the answer, with the target's budget as its length.
TRAINED_SETTINGS = {
    "--checkpoint": [(k, k) for k in ("rewrite_template", "response_length", "max_prompt_length", "stop_token_id",
                                      "target_prompt_template", "target_system_prompt", "target_use_chat_template")],
    "--oracle-checkpoint": [("response_length", "target_max_new_tokens"), ("max_prompt_length", "max_prompt_length"),
                            ("stop_token_id", "stop_token_id"), ("target_system_prompt", "target_system_prompt")],
    # The target's proposals and the stabiliser the proxy learned its decisions under (and its KL reference).
    "--proxy-checkpoint": [(k, k) for k in ("max_rejections_per_token", "target_temperature", "target_top_p",
                                            "target_top_k", "target_max_new_tokens", "accept_prior")],
    # The PPO corrector: its own decoding (trainer settings of its run), and its AlignerEnvironment's (recorded as
    # "environment.<key>"): the request's template and how the target drafted. Evaluated keys that are no run-file
    # setting are the flags', named in EVAL_FLAGS.
    "--aligner-ppo-checkpoint": [("response_length", "aligner_ppo_max_new_tokens"),
                                 ("max_prompt_length", "max_prompt_length"), ("stop_token_id", "stop_token_id"),
                                 ("environment.correction_template", "aligner_ppo_template"),
                                 ("environment.max_new_tokens", "target_max_new_tokens"),
                                 ("environment.temperature", "target_temperature"),
                                 ("environment.top_p", "target_top_p"),
                                 ("environment.use_chat_template", "target_use_chat_template"),
                                 ("environment.system_prompt", "target_system_prompt")],
}
EVAL_FLAGS = {"aligner_ppo_template": "--aligner-ppo-template",
              "aligner_ppo_max_new_tokens": "--aligner-ppo-max-new-tokens"}


def check_checkpoint_kinds(args) -> None:
    """A corrector or a model another arm trained, given to --checkpoint / --oracle-checkpoint /
    --aligner-ppo-checkpoint, is one line naming the flag it belongs to. A PPO model whose recorded environment is
    not AlignerEnvironment is no PPO corrector; one saved before the environment was recorded is accepted."""
    from alignfast.cli.checkpoints import policy_dir, trained_as, trained_environment

    for flag, path in (("--checkpoint", args.checkpoint), ("--oracle-checkpoint", args.oracle_checkpoint),
                       ("--aligner-ppo-checkpoint", getattr(args, "aligner_ppo_checkpoint", None))):
        if not path:
            continue
        folder = policy_dir(path)
        if (folder / "aligner_config.json").is_file() or (Path(path) / "aligner_config.json").is_file():
            raise CLIError(f"{flag} {path} is an Aligner corrector trained by SFT (it holds aligner_config.json): "
                           "pass it as --aligner-checkpoint")
        arm, _ = trained_as(folder)
        environment, _ = trained_environment(folder)
        other = FLAG_OF_ARM.get(arm)
        if arm == "ppo" and environment not in (None, PPO_ENVIRONMENT):
            other = None  # PPO in an environment of the user's: no arm of `alignfast eval` rebuilds it
        if arm is not None and arm != EXPECTED_ARM[flag]:
            raise CLIError(f"{flag} {path} was trained as the {arm} arm, not {EXPECTED_ARM[flag]}"
                           + (f": pass it as {other}" if other else ""))
        if arm == "ppo" and other is None:
            raise CLIError(f"{flag} {path} was trained by PPO in {environment}, not {PPO_ENVIRONMENT}: the Aligner "
                           "(PPO corrector) arm decodes it after the target's drafts")


def settings_against_training(args, cfg, config: dict) -> dict:
    """{flag: {key: {"trained": value, "evaluated": value}}} for every setting that differs from the run that
    trained the checkpoint (a warning each; the evaluation may mean it, as an ablation), recorded in eval.json.
    config: the run file; the Oracle gets target.system_prompt whatever target.engine is (as in training); a proxy
    is checked against the run file's ProxyRLHFConfig (cfg, the other arms', has none of its fields)."""
    from alignfast.cli.config import section

    from alignfast.cli.checkpoints import policy_dir, trained_as, trained_environment

    differ: dict = {}
    for flag, path in (("--checkpoint", args.checkpoint), ("--oracle-checkpoint", args.oracle_checkpoint),
                       ("--proxy-checkpoint", getattr(args, "proxy_checkpoint", None)),
                       ("--aligner-ppo-checkpoint", getattr(args, "aligner_ppo_checkpoint", None))):
        if not path:
            continue
        evaluated = cfg
        if flag == "--proxy-checkpoint":
            from alignfast.cli.eval_proxy import proxy_dir
            from alignfast.cli.train_proxy import proxy_trainer_config

            folder, evaluated = proxy_dir(path), proxy_trainer_config(config)
        else:
            folder = policy_dir(path)
        _, trained = trained_as(folder)
        if not trained or "kl_coef" not in trained:  # not a trainer's settings
            trained = {}
        if flag == "--aligner-ppo-checkpoint":
            from types import SimpleNamespace

            from alignfast.cli.eval_aligner import ppo_budget, ppo_template

            _, env_settings = trained_environment(folder)
            trained = {**trained, **{f"environment.{k}": v for k, v in (env_settings or {}).items()}}
            evaluated = SimpleNamespace(**cfg.to_dict(), aligner_ppo_template=ppo_template(args, folder),
                                        aligner_ppo_max_new_tokens=ppo_budget(args, cfg, folder)[0])
        for trained_key, eval_key in TRAINED_SETTINGS[flag]:
            if trained_key not in trained:
                continue
            now = getattr(evaluated, eval_key)
            if flag == "--oracle-checkpoint" and eval_key == "target_system_prompt":
                now = section(config, "target").get("system_prompt")
            if trained[trained_key] != now:
                differ.setdefault(flag, {})[eval_key] = {"trained": trained[trained_key], "evaluated": now}
                where = ("--target.system_prompt" if eval_key == "target_system_prompt"
                         else EVAL_FLAGS.get(eval_key, f"--trainer.{eval_key}"))
                _log.warning("%s %s was trained with %s=%r and is evaluated with %s=%r (%s); %s sets it",
                             flag, path, trained_key, trained[trained_key], eval_key, now,
                             "given" if eval_key in EVAL_FLAGS else "the run file's", where)
    return differ


def recorded_checkpoints(args) -> dict:
    """The checkpoints of this evaluation, as eval.json records them (absolute paths)."""
    from alignfast.eval.report_files import CHECKPOINT_KEYS, as_recorded

    return {key: as_recorded(getattr(args, key)) for key in CHECKPOINT_KEYS}


def check_default_output(out: Path, args) -> None:
    """Without --output-dir the reports go beside the first checkpoint, which every checkpoint of one run shares:
    an eval.json there that evaluated other checkpoints is kept, and this command names --output-dir."""
    if args.output_dir or not (out / "eval.json").is_file():
        return
    try:
        earlier = json.loads((out / "eval.json").read_text())
    except (OSError, ValueError):
        return
    def same(a, b) -> bool:  # one folder, however spelled (a trailing slash, relative or absolute)
        if a is None or b is None:
            return a is b
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()

    mine = recorded_checkpoints(args)
    differ = [k for k, v in mine.items() if not same(earlier.get(k), v)]
    if any(k in earlier for k in mine) and differ:
        def shown(record):
            # each differing flag, with its folder or "no --flag" (an evaluation that had no such arm)
            return ", ".join(f"--{k.replace('_', '-')} {record[k]}" if record.get(k) else f"no --{k.replace('_', '-')}"
                             for k in differ)

        raise CLIError(f"{out / 'eval.json'} holds an evaluation of other checkpoints (there: {shown(earlier)}; "
                       f"here: {shown(mine)}): pass --output-dir to keep both, or delete it")
