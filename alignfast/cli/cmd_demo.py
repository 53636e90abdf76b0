"""`alignfast demo`: argument parsing (the work is in alignfast.cli.demo)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="align a tiny frozen model with a trained prompter, offline, in a few CPU minutes",
        description="Runs Align-Pro on the embedded toy world (no download): a frozen tiny target that misreads "
                    "terse commands, an SFT prompter that mostly copies them, and a reward that checks the "
                    "target's answer against the original command. Prints No fine-tuning / SFT prompter / "
                    "Align-Pro / Oracle / Aligner (SFT) / Proxy-RLHF on held-out prompts (mean reward, variance, "
                    "win rate), a few prompts before and after, and writes results, rollouts, metrics and a "
                    "reward plot.")
    p.add_argument("--output-dir", default="alignfast-demo", help="where results go (default: ./alignfast-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and evaluation (default: 0)")
    p.add_argument("--episodes", type=int, default=None,
                   help="PPO episodes per arm (default: the world's recommended budget)")
    p.add_argument("--no-oracle", action="store_true", help="skip the Oracle arm (PPO on the target itself)")
    p.add_argument("--no-proxy", action="store_true",
                   help="skip the Proxy-RLHF arm (a proxy judging the target's tokens)")
    p.add_argument("--no-aligner", action="store_true", help="skip the Aligner arm (a corrector after the target)")
    p.add_argument("--backend", choices=["fast", "reference"], default="fast",
                   help="fast: alignfast's fused kernels; reference: plain PyTorch (same algorithm, for comparison)")
    p.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")
    p.set_defaults(run=run)


def run(args, extra) -> int:
    from alignfast.cli.demo import run_demo
    from alignfast.cli.errors import CLIError

    if args.episodes is not None and args.episodes < 1:
        raise CLIError(f"--episodes must be >= 1, got {args.episodes}")
    from alignfast.ops import AlignfastArgumentError

    try:
        run_demo(args.output_dir, seed=args.seed, episodes=args.episodes, oracle=not args.no_oracle,
                 backend=args.backend, show_progress=args.progress or None, proxy=not args.no_proxy,
                 aligner=not args.no_aligner)
    except AlignfastArgumentError as err:  # --episodes becomes each arm's total_episodes: say it in the flag's name
        raise CLIError(str(err).removeprefix("alignfast: ").replace("argument 'total_episodes'", "--episodes")) \
            from None
    return 0
