"""`alignfast eval`: the paper's comparison table for a trained prompter on held-out prompts."""

from __future__ import annotations

import sys
from pathlib import Path

from alignfast.files import write_text_atomically

BASELINE = "No fine-tuning"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="compare trained arms (Align-Pro, Oracle, Aligner, Proxy-RLHF) with No fine-tuning on "
                     "held-out prompts",
        description="Scores data.eval of the run file with No fine-tuning (the frozen target answers the prompt), "
                    "SFT prompter (before PPO) (prompter.model rewrites it, greedily; --no-sft skips it), "
                    "Align-Pro (the prompter in --checkpoint rewrites it, greedily) and, with --oracle-checkpoint, "
                    "the Oracle (a target trained with `alignfast train --oracle`); with --aligner-checkpoint / "
                    "--aligner-ppo-checkpoint, Aligner correctors after the same target; with --proxy-checkpoint, the target "
                    "decoding under a Proxy-RLHF proxy (No fine-tuning is then decoded by the proxy's decoder with "
                    "every proposal accepted). Prints mean reward, reward "
                    "variance and win rate vs No fine-tuning; writes eval.json, eval.md and the rollouts.")
    p.add_argument("--config", required=True, metavar="RUN.yaml", help="the run file used for training")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="a trained prompter: output_dir/final or output_dir/checkpoint-<step> (the Align-Pro arm)")
    p.add_argument("--oracle-checkpoint", metavar="DIR", help="a target trained with --oracle (optional)")
    p.add_argument("--no-sft", action="store_true",
                   help="skip the 'SFT prompter (before PPO)' arm: prompter.model of the run file rewriting the "
                        "prompts, which shows what PPO changed (it loads that model once more)")
    p.add_argument("--aligner-checkpoint", metavar="DIR",
                   help="an Aligner corrector trained by SFT (`alignfast aligner train`): the Aligner (SFT) arm")
    p.add_argument("--aligner-max-new-tokens", type=int, metavar="N", default=None,
                   help="the --aligner-checkpoint corrector's budget per correction (default: "
                        "trainer.target_max_new_tokens); corrections that reach it are scored cut and counted")
    p.add_argument("--aligner-ppo-checkpoint", metavar="DIR",
                   help="a corrector trained with PPO in AlignerEnvironment: the Aligner (PPO corrector) arm")
    p.add_argument("--aligner-ppo-template", metavar="TEXT", default=None,
                   help="the PPO corrector's correction_template ({prompt}, {draft}; default: the one it was trained "
                        "with, recorded in the checkpoint, else AlignerEnvironment's)")
    p.add_argument("--aligner-ppo-max-new-tokens", type=int, metavar="N", default=None,
                   help="the --aligner-ppo-checkpoint corrector's budget per correction (default: the response_length "
                        "it was trained with, else trainer.target_max_new_tokens); corrections that reach it are "
                        "scored cut and counted")
    p.add_argument("--proxy-checkpoint", metavar="DIR",
                   help="a proxy trained with `alignfast train --method proxy` (<output_dir>/proxy/final or a "
                        "checkpoint-<step> there): the Proxy-RLHF arm, the target decoding under it (target.engine hf)")
    p.add_argument("--output-dir", metavar="DIR",
                   help="where eval.json/eval.md go (default: next to the first checkpoint given)")
    p.add_argument("--seed", type=int, default=0, help="seed of the target's sampling when it samples (default 0)")
    p.set_defaults(run=run, accepts_overrides=True)


def run(args, overrides) -> int:
    from alignfast.cli.logs import command_logging

    with command_logging():
        return _evaluate(args, overrides)


def _evaluate(args, overrides) -> int:
    from alignfast.cli import build
    from alignfast.cli.checkpoints import load_policy, policy_dir
    from alignfast.cli.errors import CLIError
    from alignfast.cli import eval_checks
    from alignfast.cli.config import load_run_config, require, section
    from alignfast.cli.models import load_causal_lm, load_tokenizer
    from alignfast.cli.threads import fit_threads_to_machine
    from alignfast.eval import arms as arm_eval
    from alignfast.eval import compare_arms, to_json, to_markdown
    from alignfast.rollout import templates
    from alignfast.trainer.base import build_rewards
    from alignfast.trainer.environments import AlignProEnvironment, DirectEnvironment

    from alignfast.cli.models import quiet_transformers

    quiet_transformers()
    from alignfast.cli import eval_proxy
    from alignfast.cli.train_proxy import proxy_fields

    # A proxy is evaluated with the run file it was trained with, whose trainer section has the proxy's fields.
    fields = proxy_fields() if args.proxy_checkpoint else build.trainer_fields()
    config = load_run_config(args.config, overrides, trainer_fields=fields)
    checkpoints = [c for c in (args.checkpoint, args.aligner_checkpoint, args.aligner_ppo_checkpoint,
                               args.oracle_checkpoint, args.proxy_checkpoint) if c]
    if not checkpoints:
        raise CLIError("give at least one of --checkpoint, --aligner-checkpoint, --aligner-ppo-checkpoint, "
                       "--oracle-checkpoint, --proxy-checkpoint")
    # A wrong folder fails before any model runs.
    for path in (args.checkpoint, args.aligner_checkpoint, args.aligner_ppo_checkpoint, args.oracle_checkpoint):
        if path:
            policy_dir(path)
    from alignfast.cli.eval_aligner import check_aligner_checkpoint, check_budget_flag

    check_budget_flag(args)
    if args.aligner_checkpoint:
        check_aligner_checkpoint(args.aligner_checkpoint)
    if args.proxy_checkpoint:
        eval_proxy.proxy_dir(args.proxy_checkpoint)
    eval_checks.check_checkpoint_kinds(args)
    if args.checkpoint and not args.no_sft:  # the SFT arm loads prompter.model (after the target and a whole arm)
        require(config, "prompter.model")
    if not args.proxy_checkpoint:
        eval_proxy.ignored_proxy_fields(config)
    arms_config = eval_proxy.without_proxy_fields(config)  # the other arms read the rest as an AlignProConfig
    cfg = build.trainer_config(arms_config, output_dir=str(Path(checkpoints[0]).parent))
    if (args.aligner_checkpoint or args.aligner_ppo_checkpoint) and cfg.target_num_samples > 1:
        raise CLIError(f"the Aligner arms correct one answer per prompt, and trainer.target_num_samples is "
                       f"{cfg.target_num_samples} (No fine-tuning's score is the mean over that many): set it to 1")
    if args.proxy_checkpoint and cfg.target_num_samples > 1:
        raise CLIError(f"the Proxy-RLHF arm decodes one answer per prompt, and trainer.target_num_samples is "
                       f"{cfg.target_num_samples} (No fine-tuning's score is the mean over that many): set it to 1")
    out = Path(args.output_dir) if args.output_dir else Path(checkpoints[0]).parent
    eval_checks.check_default_output(out, args)
    settings_differ = eval_checks.settings_against_training(args, cfg, config)
    build.preflight_target(config)  # a wrong target.base_url fails here, before any model loads
    fit_threads_to_machine()
    device = build.default_device()
    _, evals = build.load_data(config, need_train=False, need_eval=True)
    prompts = [r["prompt"] for r in evals]
    columns = {k: [r.get(k) for r in evals] for k in evals[0] if k != "prompt"}
    r = build.build_rewards(config, device=device, search_dirs=build.run_file_dirs(args.config, overrides))
    rewards = build_rewards(cfg, reward_model=r.reward_model, reward_tokenizer=r.reward_tokenizer,
                            reward_funcs=r.reward_funcs, reward_weights=r.reward_weights, device=device)
    engine, target_tokenizer = build.build_target_engine(config, device=device)
    from alignfast.trainer.align_pro import check_target_room

    # the target's budget named as the setting it is (the engine's own error named its 'max_new_tokens' argument)
    check_target_room(getattr(engine, "model", None), cfg.target_max_new_tokens)
    env = AlignProEnvironment.from_config(cfg, engine, rewards, target_tokenizer=target_tokenizer)

    proxy = eval_proxy.proxy_trainer(args, config, engine, r, prompts, device=device) if args.proxy_checkpoint else None
    if proxy is not None:  # decoded as the proxy's arm is: the two differ only by the proxy's decisions
        results = {BASELINE: eval_proxy.no_fine_tuning_arm(proxy, BASELINE, prompts, columns, seed=args.seed)}
    else:
        results = {BASELINE: arm_eval.no_fine_tuning(env, prompts, columns, seed=args.seed)}
    if args.checkpoint and not args.no_sft:  # the prompter before PPO (prompter.model, without the checkpoint's training)
        spec = section(config, "prompter")
        sft = load_causal_lm(spec, "prompter", device=device).eval().requires_grad_(False)
        sft_tok = load_tokenizer(spec, "prompter")
        results[arm_eval.SFT] = arm_eval.with_policy(arm_eval.SFT, env, policy_engine(sft, sft_tok, cfg), sft_tok,
                                                     prompts, columns, max_new_tokens=cfg.response_length,
                                                     seed=args.seed)
        del sft  # freed before the trained prompter loads
    if args.checkpoint:
        prompter, prompter_tok = load_policy(args.checkpoint, base_spec=section(config, "prompter"), role="prompter",
                                             device=device)
        results["Align-Pro"] = arm_eval.with_policy("Align-Pro", env, policy_engine(prompter, prompter_tok, cfg),
                                                    prompter_tok, prompts, columns, max_new_tokens=cfg.response_length,
                                                    seed=args.seed)
    if args.aligner_checkpoint or args.aligner_ppo_checkpoint:
        from alignfast.cli.eval_aligner import aligner_arms

        results.update(aligner_arms(args, config, cfg, env, engine, target_tokenizer, rewards, prompts, columns,
                                    baseline=results[BASELINE], device=device))
    if args.oracle_checkpoint:
        oracle, oracle_tok = load_policy(args.oracle_checkpoint, base_spec=section(config, "target"), role="oracle",
                                         device=device)
        # The Oracle's policy is the target, run here whatever target.engine says: it answers after the target's
        # system message as the frozen target does.
        oracle_system_prompt = section(config, "target").get("system_prompt")
        from alignfast.trainer.oracle import ORACLE_SYSTEM_PROMPT_HINT

        templates.check_system_prompt(oracle_tok, oracle_system_prompt, use_chat_template=True,
                                      name="target.system_prompt", instead=ORACLE_SYSTEM_PROMPT_HINT)
        results["Oracle"] = arm_eval.with_policy("Oracle", DirectEnvironment(rewards),
                                                 policy_engine(oracle, oracle_tok, cfg), oracle_tok, prompts, columns,
                                                 max_new_tokens=cfg.target_max_new_tokens, seed=args.seed,
                                                 rewrites=False, system_prompt=oracle_system_prompt)

    if proxy is not None:
        results[eval_proxy.PROXY_NAME] = eval_proxy.proxy_arm(proxy, prompts, columns, seed=args.seed)

    rows = compare_arms({name: res.scores for name, res in results.items()}, baseline=BASELINE)
    out.mkdir(parents=True, exist_ok=True)
    table = to_markdown(rows, baseline=BASELINE)
    # What the table's means hide (corrections scored cut): under the table, and in eval.json with the counts.
    notes = [n for res in results.values() for n in res.notes]
    if notes:
        table += "\n\n" + "\n".join(f"- {n}" for n in notes)
    truncated = {name: sum(res.truncated) for name, res in results.items() if res.truncated is not None}
    # each written whole or not at all (alignfast.files): a kill mid-write leaves the earlier file, not half a new one
    write_text_atomically(out / "eval.json", to_json(rows, baseline=BASELINE, extra={
        **eval_checks.recorded_checkpoints(args), "seed": args.seed, "prompts": len(prompts),
        "settings_differ_from_training": settings_differ, **({"truncated": truncated} if truncated else {}),
        **({"notes": notes} if notes else {}),
        **({"no_fine_tuning_decoding": "the proxy's decoder, every proposal accepted"} if proxy is not None else {})}))
    write_text_atomically(out / "eval.md", table + "\n")
    arm_eval.write_rollouts(results, out / "eval_rollouts.jsonl")
    print(table)
    print(f"alignfast eval: {len(prompts)} prompts; wrote {out / 'eval.json'}, {out / 'eval.md'}, "
          f"{out / 'eval_rollouts.jsonl'}", file=sys.stderr)
    return 0


def policy_engine(model, tokenizer, cfg):
    """A trained policy's greedy decoder that stops and truncates as the trainer's sampler did: on EOS, the
    generation config's EOS ids and trainer.stop_token_id; inputs cut to their last max_prompt_length tokens."""
    from alignfast.rollout import HFEngine
    from alignfast.trainer.base import _special_ids

    _, stops = _special_ids(tokenizer, model, cfg.stop_token_id)
    return HFEngine(model, tokenizer, eos_token_id=stops, max_prompt_length=cfg.max_prompt_length)
