"""The Proxy-RLHF arm of `alignfast eval`: the same frozen target decodes data.eval's prompts while a trained
proxy (`alignfast train --method proxy`) accepts or rejects each token it proposes, with greedy decisions
(accept when P(accept) >= 1/2), as the trainer's own `rollout()` does; its answers are scored like every arm's.

The decoding settings (target_max_new_tokens, max_rejections_per_token, target_temperature/top_k/top_p) are
read from the run file's trainer section, so pass the run file the proxy was trained with.

No fine-tuning is then decoded by the same decoder under a judge that accepts every proposal, with the same
settings and seed (ProxyRLHFTrainer.target_rollout): the HF engine's sampling rule differs from the decoder's when
target_top_p < 1 or target_top_k > 0, and an always-accepting proxy showed wins and losses of that difference
(23 / 189 / 38 of 250 at top_p 0.9). The other arms of the same evaluation are compared with that No fine-tuning.
"""

from __future__ import annotations

from pathlib import Path

PROXY_NAME = "Proxy-RLHF"


def without_proxy_fields(config: dict) -> dict:
    """The run file with the trainer keys only ProxyRLHFConfig has removed: the other arms read the rest as an
    AlignProConfig (one run file serves `--method proxy` training and this evaluation)."""
    import dataclasses

    from alignfast.trainer import AlignProConfig
    from alignfast.trainer.proxy_rlhf import ProxyRLHFConfig

    only_proxy = {f.name for f in dataclasses.fields(ProxyRLHFConfig)} - {f.name for f in dataclasses.fields(AlignProConfig)}
    trainer = {k: v for k, v in (config.get("trainer") or {}).items() if k not in only_proxy}
    return {**config, "trainer": trainer}


def ignored_proxy_fields(config: dict) -> list[str]:
    """The run file's proxy-only trainer keys, which an evaluation without --proxy-checkpoint does not use: they are
    dropped with one warning naming them (they were an error whose hint, "add --method proxy", named a flag eval
    has not; a proxy's run file may well be the one an Aligner or Align-Pro checkpoint is evaluated with)."""
    import logging

    dropped = sorted(set(config.get("trainer") or {}) - set(without_proxy_fields(config)["trainer"]))
    if dropped:
        logging.getLogger("alignfast.eval").warning(
            "%s %s Proxy-RLHF setting%s, not used without --proxy-checkpoint",
            ", ".join(f"trainer.{k}" for k in dropped), "are" if len(dropped) > 1 else "is a",
            "s" if len(dropped) > 1 else "")
    return dropped


def proxy_dir(path: str | Path) -> Path:
    """The folder holding a saved proxy: <output_dir>/proxy/final, or a checkpoint-<step> (its policy/)."""
    from alignfast.cli.checkpoints import model_root
    from alignfast.cli.errors import CLIError
    from alignfast.trainer.proxy_model import CONFIG_NAME

    p = model_root(path, "--proxy-checkpoint not found")
    if not (p / CONFIG_NAME).is_file():
        from alignfast.cli.checkpoints import trained_as
        from alignfast.cli.eval_checks import FLAG_OF_ARM

        arm, _ = trained_as(p)
        if (p / "aligner_config.json").is_file():
            arm = "aligner"
        if arm in FLAG_OF_ARM and arm != "proxy":
            raise CLIError(f"--proxy-checkpoint {p} was trained as the {arm} arm: pass it as {FLAG_OF_ARM[arm]}")
        hint = (f"; the proxy of this run is in {p / 'proxy' / 'final'}" if (p / "proxy" / "final").is_dir()
                else "; pass <output_dir>/proxy/final or <output_dir>/proxy/checkpoint-<step>")
        raise CLIError(f"--proxy-checkpoint {p} holds no {CONFIG_NAME} (not a proxy saved by "
                       f"`alignfast train --method proxy`){hint}")
    return p


def proxy_trainer(args, config, engine, rewards_spec, prompts: list[str], *, device):
    """The ProxyRLHFTrainer that decodes for both of the proxy's comparisons: the proxy in args.proxy_checkpoint
    over eval's target, scored by eval's rewards.

    engine: eval's in-process target engine (its model is reused, not loaded twice); rewards_spec: the
    reward model/functions eval built (the arm is scored by the same ones)."""
    from alignfast.cli.config import section
    from alignfast.cli.errors import CLIError
    from alignfast.cli.models import load_tokenizer
    from alignfast.cli.train_proxy import proxy_trainer_config
    from alignfast.ops import AlignfastArgumentError
    from alignfast.rollout import HFEngine
    from alignfast.trainer.proxy_model import ProxyModel
    from alignfast.trainer.proxy_rlhf import ProxyRLHFTrainer

    where = proxy_dir(args.proxy_checkpoint)
    spec = section(config, "target")
    if not isinstance(engine, HFEngine):
        raise CLIError(f"--proxy-checkpoint needs target.engine: hf (the proxy reads the target's hidden states "
                       f"and KV cache), got {spec.get('engine')!r}")
    import dataclasses

    # The trainer is built to decode, not to train: a run file's eval_steps (which needs an eval set to train with)
    # does not apply here.
    cfg = dataclasses.replace(proxy_trainer_config(config), eval_steps=None)
    try:
        proxy = ProxyModel.from_pretrained(where)
        return ProxyRLHFTrainer(cfg, engine.model, load_tokenizer(spec, "target"), proxy=proxy,
                                reward_model=rewards_spec.reward_model, reward_tokenizer=rewards_spec.reward_tokenizer,
                                reward_funcs=rewards_spec.reward_funcs, reward_weights=rewards_spec.reward_weights,
                                train_dataset=[{"prompt": p} for p in prompts])
    except (AlignfastArgumentError, FileNotFoundError) as err:
        raise CLIError("--proxy-checkpoint: " + str(err).removeprefix("alignfast: ")) from None


def no_fine_tuning_arm(trainer, name: str, prompts: list[str], columns: dict, *, seed: int):
    """ArmResult of the untouched target decoded as the proxy's arm is (ProxyRLHFTrainer.target_rollout: the same
    decoder, settings and draws, every proposal accepted), so the proxy's wins and losses come from its decisions,
    not from the HF engine's other sampling rule when target_top_p < 1 or target_top_k > 0."""
    return _arm(name, prompts, lambda: trainer.target_rollout(prompts, seed=seed, columns=columns))


def proxy_arm(trainer, prompts: list[str], columns: dict, *, seed: int):
    """ArmResult of the target decoding under the trained proxy (greedy decisions)."""
    return _arm(PROXY_NAME, prompts, lambda: trainer.rollout(prompts, greedy=True, seed=seed, columns=columns))


def _arm(name: str, prompts: list[str], decode):
    from alignfast.cli.errors import CLIError
    from alignfast.eval.arms import ArmResult
    from alignfast.ops import AlignfastArgumentError

    try:
        res = decode()
    except AlignfastArgumentError as err:
        raise CLIError("--proxy-checkpoint: " + str(err).removeprefix("alignfast: ")) from None
    return ArmResult(name, list(prompts), list(prompts), list(res.answers), [float(s) for s in res.scores],
                     dict(res.reward_components))
