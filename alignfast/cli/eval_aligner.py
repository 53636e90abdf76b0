"""The Aligner arms of `alignfast eval`: a corrector after the same frozen target, on the same prompts.

    Aligner (SFT)             --aligner-checkpoint: a corrector from `alignfast aligner train`; it rewrites the
                              No fine-tuning answers (the target's answers to x), greedily
    Aligner (PPO corrector)   --aligner-ppo-checkpoint: a policy trained by PPO in AlignerEnvironment (the
                              target drafts, the policy writes the final answer from its correction_template); it
                              corrects the same drafts as the SFT arm (the No fine-tuning answers), greedily

The PPO corrector's environment is rebuilt from what its trainer recorded (trainer.base.ARM_FILE): its
correction_template unless --aligner-ppo-template gives one, and its budget is its run's response_length unless
--aligner-ppo-max-new-tokens gives one (trainer.target_max_new_tokens for a folder that records neither); every
recorded setting that differs from the evaluation's is a warning and eval.json's settings_differ_from_training.
"""

from __future__ import annotations

import logging

SFT_NAME = "Aligner (SFT)"
PPO_NAME = "Aligner (PPO corrector)"

_log = logging.getLogger("alignfast.eval")


def corrector_budget(args, cfg) -> tuple[int, str]:
    """(the SFT corrector's max_new_tokens, the setting it comes from): --aligner-max-new-tokens, else the target's
    budget (trainer.target_max_new_tokens), as before the flag existed."""
    if args.aligner_max_new_tokens is None:
        return cfg.target_max_new_tokens, "trainer.target_max_new_tokens"
    return args.aligner_max_new_tokens, "--aligner-max-new-tokens"


def ppo_budget(args, cfg, folder) -> tuple[int, str]:
    """(the PPO corrector's max_new_tokens, the setting it comes from): --aligner-ppo-max-new-tokens, else the
    response_length it was trained with (its run's settings), else trainer.target_max_new_tokens (a folder that does
    not record its run, as before the record was read)."""
    from alignfast.cli.checkpoints import trained_as

    if getattr(args, "aligner_ppo_max_new_tokens", None) is not None:
        return args.aligner_ppo_max_new_tokens, "--aligner-ppo-max-new-tokens"
    _, trained = trained_as(folder)
    if trained and isinstance(trained.get("response_length"), int):
        return trained["response_length"], "the response_length it was trained with"
    return cfg.target_max_new_tokens, "trainer.target_max_new_tokens"


def ppo_template(args, folder) -> str:
    """The PPO corrector's correction_template: --aligner-ppo-template, else the one it was trained with (recorded
    with it), else AlignerEnvironment's default."""
    from alignfast.cli.checkpoints import trained_environment
    from alignfast.trainer.environments import DEFAULT_CORRECTION_TEMPLATE

    if args.aligner_ppo_template is not None:
        return args.aligner_ppo_template
    _, settings = trained_environment(folder)
    recorded = (settings or {}).get("correction_template")
    return recorded if isinstance(recorded, str) else DEFAULT_CORRECTION_TEMPLATE


def check_budget_flag(args) -> None:
    """--aligner-max-new-tokens / --aligner-ppo-max-new-tokens before any model loads: >= 1, and only beside the
    checkpoint whose corrector it bounds."""
    from alignfast.cli.errors import CLIError

    for flag, value, owner, given in (
            ("--aligner-max-new-tokens", args.aligner_max_new_tokens, "--aligner-checkpoint", args.aligner_checkpoint),
            ("--aligner-ppo-max-new-tokens", getattr(args, "aligner_ppo_max_new_tokens", None),
             "--aligner-ppo-checkpoint", args.aligner_ppo_checkpoint)):
        if value is None:
            continue
        if not given:
            raise CLIError(f"{flag} is the budget of the {owner} corrector, which is not given")
        if value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")


def check_room(model, budget: int, setting: str, name: str, hint: str) -> None:
    """A budget that leaves a corrector no room for its input, named as the setting it is (the engine's own error
    named its 'max_new_tokens' argument)."""
    from alignfast.cli.errors import CLIError
    from alignfast.rollout.context import max_positions

    positions = max_positions(model)
    if positions is not None and budget >= positions:
        raise CLIError(f"{setting} ({budget}) leaves no room for the {name} corrector's input: its "
                       f"max_position_embeddings is {positions}" + hint)


def truncated_note(result, budget: int, setting: str) -> str | None:
    """A line for the report (and the warning) when corrections of the arm stopped at the corrector's budget: they
    are scored as they are, cut, which a mean reward alone does not show."""
    cut = sum(result.truncated or ())
    if not cut:
        return None
    return (f"{result.name}: {cut} of {len(result.truncated)} corrections stopped at the corrector's max_new_tokens "
            f"({budget}, {setting}) before EOS and are scored cut (\"truncated\" in eval_rollouts.jsonl)")


def check_aligner_checkpoint(path: str) -> None:
    """A folder that is not a saved corrector fails before any model runs (as the other checkpoints do)."""
    from alignfast.aligner import Corrector
    from alignfast.cli.checkpoints import policy_dir
    from alignfast.cli.errors import flag_error
    from alignfast.ops import AlignfastArgumentError

    try:
        Corrector.settings_file(policy_dir(path))
    except AlignfastArgumentError as err:
        raise flag_error("--aligner-checkpoint", "aligner", path, err) from None


def aligner_arms(args, config, cfg, env, engine, target_tokenizer, rewards, prompts, columns, *, baseline,
                 device) -> dict:
    from alignfast.aligner import Corrector
    from alignfast.cli.checkpoints import load_policy, policy_dir, trained_environment
    from alignfast.cli.cmd_eval import policy_engine
    from alignfast.cli.config import section
    from alignfast.cli.errors import CLIError, flag_error
    from alignfast.eval import arms as arm_eval
    from alignfast.ops import AlignfastArgumentError
    from alignfast.trainer.environments import AlignerEnvironment

    out = {}
    if args.aligner_checkpoint:
        budget, setting = corrector_budget(args, cfg)
        try:
            corrector = Corrector.from_pretrained(policy_dir(args.aligner_checkpoint), device=device,
                                                  max_new_tokens=budget, batch_size=cfg.per_device_eval_batch_size)
        except AlignfastArgumentError as err:  # the folder, or a setting its aligner_config.json holds
            raise flag_error("--aligner-checkpoint", "aligner", args.aligner_checkpoint, err) from None
        check_room(corrector.model, budget, setting, "Aligner (SFT)",
                   "" if args.aligner_max_new_tokens is not None
                   else "; --aligner-max-new-tokens sets the corrector's own budget")
        out[SFT_NAME] = arm_eval.with_corrector(SFT_NAME, env, corrector, prompts, columns, answers=baseline.answers,
                                                seed=args.seed)
        _note_cut(out[SFT_NAME], budget, setting)
    if args.aligner_ppo_checkpoint:
        folder = policy_dir(args.aligner_ppo_checkpoint)
        budget, setting = ppo_budget(args, cfg, folder)
        template = ppo_template(args, folder)
        if args.aligner_ppo_template is None and "correction_template" not in (trained_environment(folder)[1] or {}):
            _log.warning("--aligner-ppo-checkpoint %s records no correction_template (saved before alignfast recorded "
                         "it): its requests use AlignerEnvironment's default %r; --aligner-ppo-template gives the one "
                         "it was trained with", args.aligner_ppo_checkpoint, template)
        model, tok = load_policy(args.aligner_ppo_checkpoint, base_spec=section(config, "prompter"),
                                 role="PPO corrector", device=device)
        check_room(model, budget, setting, "Aligner (PPO)",
                   "" if args.aligner_ppo_max_new_tokens is not None
                   else "; --aligner-ppo-max-new-tokens sets the corrector's own budget")
        try:  # the target as the other arms run it; its drafts are the No fine-tuning answers (given below)
            ppo_env = AlignerEnvironment(engine, rewards, target_tokenizer=target_tokenizer,
                                         correction_template=template, max_new_tokens=cfg.target_max_new_tokens,
                                         temperature=cfg.target_temperature, top_p=cfg.target_top_p,
                                         batch_size=cfg.target_batch_size,
                                         use_chat_template=cfg.target_use_chat_template,
                                         system_prompt=cfg.target_system_prompt)
        except AlignfastArgumentError as err:
            name = "--aligner-ppo-template" if args.aligner_ppo_template is not None else \
                f"the correction_template recorded with {args.aligner_ppo_checkpoint}"
            raise CLIError(f"{name} must " + str(err).split(" must ", 1)[-1]) from None
        out[PPO_NAME] = arm_eval.with_policy(PPO_NAME, ppo_env, policy_engine(model, tok, cfg), tok, prompts, columns,
                                             max_new_tokens=budget, seed=args.seed, rewrites=False,
                                             drafts=baseline.answers, report_truncated=True)
        _note_cut(out[PPO_NAME], budget, setting)
    return out


def _note_cut(result, budget: int, setting: str) -> None:
    note = truncated_note(result, budget, setting)
    if note:  # said once now, and under the table in eval.md and in eval.json ("notes")
        _log.warning("%s", note)
        result.notes.append(note)
