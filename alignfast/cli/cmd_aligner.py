"""`alignfast aligner train`: an Aligner corrector trained by SFT on {question, answer, correction} rows.

Run file sections: aligner {model, tokenizer, dtype, lora, ...}, data {train, eval}, trainer {AlignerConfig
fields}. Overrides as for `alignfast train`: --trainer.learning_rate 1e-5, --aligner.model ./qwen, or a bare
trainer field (--max_steps 10).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("aligner", help="train an Aligner corrector by SFT (arXiv 2402.02416)",
                       description="Aligner: a small corrector that rewrites an upstream model's answer. "
                                   "`alignfast aligner train --config configs/aligner_toy.yaml` trains one by SFT.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    t = actions.add_parser(
        "train", help="SFT of the corrector on correction rows",
        description="Trains aligner.model on data.train rows {question, answer, correction} (loss on the correction "
                    "and EOS only), writing metrics.jsonl, checkpoints and final/ under trainer.output_dir. Any "
                    "setting can be overridden: --trainer.learning_rate 1e-5, --aligner.model ./qwen, --max_steps 10.",
        epilog="Sections of the run file: aligner, data, trainer (AlignerConfig fields). See configs/aligner_*.yaml.")
    t.add_argument("--config", required=True, metavar="ALIGNER.yaml", help="the run file (YAML)")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or from the latest checkpoint in output_dir when given alone")
    t.set_defaults(run=run, accepts_overrides=True)


def trainer_fields() -> set[str]:
    import dataclasses

    from alignfast.aligner import AlignerConfig

    return {f.name for f in dataclasses.fields(AlignerConfig)}


def aligner_config(config: dict):
    from alignfast.aligner import AlignerConfig
    from alignfast.cli.config import section
    from alignfast.cli.errors import CLIError
    from alignfast.ops import AlignfastArgumentError

    try:
        return AlignerConfig.from_dict(section(config, "trainer"))
    except AlignfastArgumentError as err:  # name the run file's key: trainer.<field>
        msg = re.sub(r"^argument '([^']+)'", r"trainer.\1", str(err).removeprefix("alignfast: "))
        raise CLIError(msg.replace("config key '", "key 'trainer.")) from None


def run(args, overrides) -> int:
    from alignfast.cli.logs import command_logging

    with command_logging():  # one line per logging step when stderr is not a terminal (nohup, CI, > log), as train
        return _train(args, overrides)


def _train(args, overrides) -> int:
    from alignfast.aligner import AlignerTrainer
    from alignfast.cli import build
    from alignfast.cli.aligner_data import load_rows
    from alignfast.cli.config import load_run_config, require, section
    from alignfast.cli.demo_aligner import SFTProgressCallback
    from alignfast.cli.errors import CLIError
    from alignfast.cli.models import load_causal_lm, load_tokenizer, quiet_transformers
    from alignfast.ops import AlignfastArgumentError
    from alignfast.trainer.results import TrainingDivergedError

    quiet_transformers()
    config = load_run_config(args.config, overrides, trainer_fields=trainer_fields())
    cfg = aligner_config(config)
    require(config, "aligner.model")
    require(config, "data.train")
    build.preflight_run(cfg, resume=args.resume)  # output_dir, report_to and threads, before any model loads
    data = section(config, "data")
    train = load_rows(data["train"], what="train")
    evals = load_rows(data["eval"], what="eval") if data.get("eval") else None
    spec = section(config, "aligner")
    model = load_causal_lm(spec, "aligner", device=build.default_device())
    try:
        trainer = AlignerTrainer(cfg, model, load_tokenizer(spec, "aligner"), train_dataset=train, eval_dataset=evals,
                                 peft_config=build.lora_config(spec.get("lora"), "aligner"),
                                 callbacks=[SFTProgressCallback("Aligner SFT")])
        result = trainer.train(resume_from_checkpoint=args.resume)
    except (AlignfastArgumentError, FileNotFoundError, TrainingDivergedError) as err:
        raise CLIError(str(err).removeprefix("alignfast: ")) from None
    final = trainer.save_model(Path(cfg.output_dir) / "final")
    if not trainer.processes.is_main:  # under N processes the main one reports
        return 0
    last = result.metrics
    extra = f"; eval/loss {last['eval/loss']:.4f}" if "eval/loss" in last else ""
    # identity rows under identity_schedule warmup are the run's first steps: said, with how many
    warmup = f", trained first in a {trainer.identity_steps}-step warm-up" if trainer.identity_steps else ""
    print(f"alignfast aligner train: {result.global_step} steps on {trainer.data_stats['rows']} rows "
          f"({trainer.data_stats['identity_rows']} identity rows added{warmup}); "
          f"last loss {last.get('loss', float('nan')):.4f}{extra}; corrector in {final}; metrics in "
          f"{Path(cfg.output_dir) / 'metrics.jsonl'}", file=sys.stderr)
    return 0
