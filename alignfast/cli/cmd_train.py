"""`alignfast train`: Align-Pro (or, with --oracle, PPO on the target itself) on real models."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a prompter with Align-Pro (the target itself with --oracle, a proxy with --method proxy)",
        description="Trains the prompter of the run file with PPO against the frozen target and the reward, "
                    "writing metrics.jsonl, checkpoints and the final model under trainer.output_dir. Any "
                    "setting of the run file can be overridden: --trainer.kl_coef 0.1, --target.model ./llama, "
                    "or a bare trainer field such as --learning_rate 1e-6.",
        epilog="Sections of the run file: prompter, target, reward, data, trainer (see configs/ and README).")
    p.add_argument("--config", required=True, metavar="RUN.yaml", help="the run file (YAML)")
    p.add_argument("--oracle", action="store_true",
                   help="train the target model itself (the paper's RLHF/Oracle arm) instead of a prompter; it writes "
                        "to <output_dir>/oracle and answers with up to trainer.target_max_new_tokens tokens, as the "
                        "frozen target does in the other arms")
    p.add_argument("--method", choices=["alignpro", "oracle", "proxy"], default=None,
                   help="alignpro (default): train the prompter; oracle: as --oracle; proxy: Proxy-RLHF, a small proxy "
                        "that accepts or rejects the frozen target's tokens (writes to <output_dir>/proxy)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or from the latest checkpoint in output_dir when given alone")
    p.set_defaults(run=run, accepts_overrides=True)


def run(args, overrides) -> int:
    from alignfast.cli.logs import command_logging

    method = getattr(args, "method", None)
    if args.oracle and method in ("alignpro", "proxy"):  # two arms asked for: say so rather than pick one
        from alignfast.cli.errors import CLIError

        raise CLIError(f"--oracle trains the target itself, --method {method} trains "
                       f"{'a prompter' if method == 'alignpro' else 'a proxy'}: give one of them")
    if method == "oracle":
        args.oracle = True
    with command_logging():  # one line per logging step when stderr is not a terminal (nohup, CI, > log)
        if getattr(args, "method", None) == "proxy":
            from alignfast.cli.train_proxy import run_proxy

            return run_proxy(args, overrides)
        return _train(args, overrides)


def _train(args, overrides) -> int:
    from alignfast.cli import build
    from alignfast.cli.config import load_run_config, require, section
    from alignfast.cli.errors import CLIError
    from alignfast.cli.models import load_causal_lm, load_tokenizer
    from alignfast.cli.progress import ProgressCallback
    from alignfast.ops import AlignfastArgumentError
    from alignfast.rollout import EngineRequestError
    from alignfast.trainer.results import TrainingDivergedError

    from alignfast.cli.models import quiet_transformers

    quiet_transformers()
    config = load_run_config(args.config, overrides, trainer_fields=build.trainer_fields())

    device = build.default_device()  # under a launcher: this process's GPU
    if args.oracle:  # its response_length is the run file's trainer.target_max_new_tokens (oracle_settings)
        from alignfast.cli.errors import name_fields_for_this_command

        name_fields_for_this_command({"argument 'response_length'": "trainer.target_max_new_tokens"})
    cfg = build.trainer_config(config, **(oracle_settings(config) if args.oracle else {}))
    if not args.oracle:  # the Oracle runs the target here, whatever target.engine says
        build.preflight_target(config)  # a wrong target.base_url fails here, before any model loads
    build.preflight_run(cfg, resume=args.resume)  # output_dir, report_to and threads, before any model loads
    train, evals = build.load_data(config, need_train=True, need_eval=False)
    rewards = build.build_rewards(config, device=device, search_dirs=build.run_file_dirs(args.config, overrides))
    common = dict(reward_model=rewards.reward_model, reward_tokenizer=rewards.reward_tokenizer,
                  reward_funcs=rewards.reward_funcs, reward_weights=rewards.reward_weights, train_dataset=train,
                  eval_dataset=evals, callbacks=[ProgressCallback(desc="Oracle PPO" if args.oracle else "Align-Pro")])
    try:
        if args.oracle:
            from alignfast.trainer import OracleTrainer

            spec = section(config, "target")
            require(config, "target.model")
            model = load_causal_lm(spec, "target", device=device)
            trainer = OracleTrainer(cfg, model, load_tokenizer(spec, "target"),
                                    peft_config=build.lora_config(spec.get("lora")), **common)
        else:
            from alignfast.trainer import AlignProTrainer

            spec = section(config, "prompter")
            require(config, "prompter.model")
            prompter = load_causal_lm(spec, "prompter", device=device)
            engine, target_tokenizer = build.build_target_engine(config, device=device)
            trainer = AlignProTrainer(cfg, prompter, load_tokenizer(spec, "prompter"), engine,
                                      target_tokenizer=target_tokenizer,
                                      peft_config=build.lora_config(spec.get("lora")), **common)
        result = trainer.train(resume_from_checkpoint=args.resume)
    except (AlignfastArgumentError, FileNotFoundError) as err:
        raise CLIError(str(err).removeprefix("alignfast: ")) from None
    except TrainingDivergedError as err:  # NaN/inf reward or loss: the message names the step and the checkpoint
        raise CLIError(str(err).removeprefix("alignfast: ")) from None
    except EngineRequestError as err:  # the target endpoint failed for good (after its retry budget)
        from alignfast.trainer.checkpoint import latest_checkpoint

        last = latest_checkpoint(cfg.output_dir)
        resume = (f"the checkpoints so far are kept (latest: {last}): once the endpoint is back, the same command "
                  "with --resume continues the run" if last is not None else
                  "no checkpoint was written yet: rerun once the endpoint is back")
        raise CLIError(f"the target failed: {err}; {resume} (target.retry_budget sets how long requests are "
                       "retried)") from None
    final = trainer.save_model(Path(cfg.output_dir) / "final")
    last = result.metrics
    if not trainer.processes.is_main:
        return 0
    print(f"alignfast train: {result.global_step} PPO steps; last objective/scores "
          f"{last.get('objective/scores', float('nan')):.4f}; model in {final}; metrics in "
          f"{Path(cfg.output_dir) / 'metrics.jsonl'}", file=sys.stderr)
    return 0


def oracle_settings(config: dict) -> dict:
    """Trainer settings the Oracle arm takes from the run file's Align-Pro ones.

    output_dir: <output_dir>/oracle, so the arm never overwrites the prompter's run (metrics, checkpoints,
    final/) when both are trained from one run file. response_length: the Oracle's policy writes the answer,
    so it gets the frozen target's answer budget (target_max_new_tokens), not the rewrite's, which is also the
    length `alignfast eval` gives it. target_system_prompt: target.system_prompt, whatever target.engine says,
    since the Oracle runs the target here."""
    import dataclasses

    from alignfast.cli.config import section
    from alignfast.trainer import AlignProConfig

    defaults = {f.name: f.default for f in dataclasses.fields(AlignProConfig)}
    trainer = section(config, "trainer")
    output_dir = trainer.get("output_dir") or defaults["output_dir"]
    return {"output_dir": str(Path(str(output_dir)) / "oracle"),
            "response_length": trainer.get("target_max_new_tokens", defaults["target_max_new_tokens"]),
            "target_system_prompt": section(config, "target").get("system_prompt")}
