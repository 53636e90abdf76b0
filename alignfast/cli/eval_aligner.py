"""The Aligner arms of `alignfast eval`: a corrector after the same frozen target, on the same prompts.

    Aligner (SFT)             --aligner-checkpoint: a corrector from `alignfast aligner train`; it rewrites the
                              No fine-tuning answers (the target's answers to x), greedily
    Aligner (PPO corrector)   --aligner-ppo-checkpoint: a policy trained by PPO in AlignerEnvironment (the
                              target drafts, the policy writes the final answer from its correction_template)
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


def check_budget_flag(args) -> None:
    """--aligner-max-new-tokens before any model loads: >= 1, and only beside --aligner-checkpoint (the SFT corrector
    it bounds; the PPO corrector's budget is the run file's)."""
    from alignfast.cli.errors import CLIError

    value = args.aligner_max_new_tokens
    if value is None:
        return
    if not args.aligner_checkpoint:
        raise CLIError("--aligner-max-new-tokens is the budget of the --aligner-checkpoint corrector, which is not "
                       "given")
    if value < 1:
        raise CLIError(f"--aligner-max-new-tokens must be >= 1, got {value}")


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
    from alignfast.cli.checkpoints import load_policy, policy_dir
    from alignfast.cli.cmd_eval import policy_engine
    from alignfast.cli.config import section
    from alignfast.cli.errors import CLIError, flag_error
    from alignfast.eval import arms as arm_eval
    from alignfast.ops import AlignfastArgumentError
    from alignfast.rollout.context import max_positions
    from alignfast.trainer.environments import DEFAULT_CORRECTION_TEMPLATE, AlignerEnvironment

    out = {}
    if args.aligner_checkpoint:
        budget, setting = corrector_budget(args, cfg)
        try:
            corrector = Corrector.from_pretrained(policy_dir(args.aligner_checkpoint), device=device,
                                                  max_new_tokens=budget, batch_size=cfg.per_device_eval_batch_size)
        except AlignfastArgumentError as err:  # the folder, or a setting its aligner_config.json holds
            raise flag_error("--aligner-checkpoint", "aligner", args.aligner_checkpoint, err) from None
        positions = max_positions(corrector.model)
        if positions is not None and budget >= positions:  # the engine's own error named its 'max_new_tokens'
            raise CLIError(f"{setting} ({budget}) leaves no room for the Aligner (SFT) corrector's input: its "
                           f"max_position_embeddings is {positions}"
                           + ("" if args.aligner_max_new_tokens is not None
                              else "; --aligner-max-new-tokens sets the corrector's own budget"))
        out[SFT_NAME] = arm_eval.with_corrector(SFT_NAME, env, corrector, prompts, columns, answers=baseline.answers,
                                                seed=args.seed)
        note = truncated_note(out[SFT_NAME], budget, setting)
        if note:  # said once now, and under the table in eval.md and in eval.json ("notes")
            _log.warning("%s", note)
            out[SFT_NAME].notes.append(note)
    if args.aligner_ppo_checkpoint:
        model, tok = load_policy(args.aligner_ppo_checkpoint, base_spec=section(config, "prompter"),
                                 role="PPO corrector", device=device)
        try:
            ppo_env = AlignerEnvironment(engine, rewards, target_tokenizer=target_tokenizer,
                                         correction_template=args.aligner_ppo_template or DEFAULT_CORRECTION_TEMPLATE,
                                         max_new_tokens=cfg.target_max_new_tokens,
                                         temperature=cfg.target_temperature, batch_size=cfg.target_batch_size,
                                         use_chat_template=cfg.target_use_chat_template,
                                         system_prompt=cfg.target_system_prompt)
        except AlignfastArgumentError as err:
            raise CLIError("--aligner-ppo-template must " + str(err).split(" must ", 1)[-1]) from None
        out[PPO_NAME] = arm_eval.with_policy(PPO_NAME, ppo_env, policy_engine(model, tok, cfg), tok, prompts, columns,
                                             max_new_tokens=cfg.target_max_new_tokens, seed=args.seed, rewrites=False)
    return out
