"""`alignfast train --method proxy`: Proxy-RLHF on a run file (the target section is the frozen model).

The run file's sections are Align-Pro's; the proxy reads `target` (the model whose decoding it oversees;
engine must be hf, since the proxy needs its hidden states and KV cache), `reward`, `data` and `trainer`
(ProxyRLHFConfig fields: AlignProConfig's plus proxy_hidden_size, max_rejections_per_token, target_top_k,
accept_prior, rejection_cost). It writes under <output_dir>/proxy, like --oracle under <output_dir>/oracle.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path


def proxy_fields() -> set[str]:
    from alignfast.trainer.proxy_rlhf import ProxyRLHFConfig

    return {f.name for f in dataclasses.fields(ProxyRLHFConfig)}


def proxy_trainer_config(config: dict):
    from alignfast.cli.build import local_target_settings
    from alignfast.cli.config import section
    from alignfast.cli.errors import CLIError
    from alignfast.ops import AlignfastArgumentError
    from alignfast.ops._checks import output_folder
    from alignfast.trainer.proxy_rlhf import ProxyRLHFConfig

    values = {**section(config, "trainer"), **local_target_settings(config)}
    try:
        # the proxy's run lives in <output_dir>/proxy; an empty output_dir is refused as the other methods refuse it
        values["output_dir"] = str(Path(output_folder("output_dir", values.get("output_dir", "alignfast-output")))
                                   / "proxy")
        return ProxyRLHFConfig.from_dict(values)
    except AlignfastArgumentError as err:
        raise CLIError(str(err).removeprefix("alignfast: ").replace("config key '", "key 'trainer.")) from None


def run_proxy(args, overrides) -> int:
    from alignfast.cli import build
    from alignfast.cli.config import load_run_config, require, section
    from alignfast.cli.errors import CLIError
    from alignfast.cli.models import load_causal_lm, load_tokenizer, quiet_transformers
    from alignfast.cli.progress import ProgressCallback
    from alignfast.ops import AlignfastArgumentError
    from alignfast.trainer.proxy_rlhf import ProxyRLHFTrainer
    from alignfast.trainer.results import TrainingDivergedError

    quiet_transformers()
    config = load_run_config(args.config, overrides, trainer_fields=proxy_fields())
    spec = section(config, "target")
    require(config, "target.model")
    if spec.get("engine", "hf") != "hf":
        raise CLIError(f"--method proxy needs target.engine: hf (the proxy reads the target's hidden states and KV "
                       f"cache), got {spec.get('engine')!r}")
    device = build.default_device()
    cfg = proxy_trainer_config(config)
    # The same checks as the other methods (build.preflight_run), and rewards found beside the run file.
    build.preflight_run(cfg, resume=args.resume)
    train, evals = build.load_data(config, need_train=True, need_eval=False)
    rewards = build.build_rewards(config, device=device, search_dirs=build.run_file_dirs(args.config, overrides))
    try:
        target = load_causal_lm(spec, "target", device=device)
        trainer = ProxyRLHFTrainer(cfg, target, load_tokenizer(spec, "target"), reward_model=rewards.reward_model,
                                   reward_tokenizer=rewards.reward_tokenizer, reward_funcs=rewards.reward_funcs,
                                   reward_weights=rewards.reward_weights, train_dataset=train, eval_dataset=evals,
                                   callbacks=[ProgressCallback(desc="Proxy-RLHF")])
        result = trainer.train(resume_from_checkpoint=args.resume)
    except (AlignfastArgumentError, FileNotFoundError, TrainingDivergedError) as err:
        raise CLIError(str(err).removeprefix("alignfast: ")) from None
    final = trainer.save_model(Path(cfg.output_dir) / "final")
    if not trainer.processes.is_main:  # under N processes the main one reports
        return 0
    last = result.metrics
    print(f"alignfast train: {result.global_step} PPO steps of Proxy-RLHF; last objective/scores "
          f"{last.get('objective/scores', float('nan')):.4f}; proxy ({trainer.proxy_fraction:.2%} of the target) in "
          f"{final}; metrics in {Path(cfg.output_dir) / 'metrics.jsonl'}", file=sys.stderr)
    return 0
