"""The demo's Aligner row: a corrector trained by SFT on the toy world's correction data, in the same run.

The corrector starts from the frozen target's own weights (the only toy model that can sort and pick
digits) and learns, from (terse command, the target's answer) -> the right answer, to fix the target's
misreadings. At evaluation it rewrites the No fine-tuning answers to the held-out prompts.
"""

from __future__ import annotations

from pathlib import Path

from alignfast.cli.progress import ProgressCallback

NAME = "Aligner (SFT)"


def aligner_arm(world, environment, target_engine, target_tokenizer, baseline, output_dir: Path, *, seed: int,
                backend: str, always: bool, episodes: int | None = None):
    """Train the corrector (AlignerTrainer) and score it on the baseline's prompts and answers. `episodes`
    (the demo's --episodes, a PPO budget of world.demo_config's total_episodes by default) scales the SFT
    steps and the rows generated for them in proportion, so a short demo stays short."""
    from transformers import AutoModelForCausalLM

    from alignfast.aligner import AlignerConfig, AlignerTrainer
    from alignfast.eval import arms as arm_eval
    from alignfast.toy.corrections import ALIGNER_DEMO_CONFIG, make_correction_data

    settings = dict(ALIGNER_DEMO_CONFIG)
    limit = None
    if episodes is not None:
        fraction = min(1.0, episodes / world.demo_config["total_episodes"])
        settings["max_steps"] = max(1, round(fraction * settings["max_steps"]))
        limit = max(settings["per_device_train_batch_size"], round(fraction * len(world.train_prompts)))
    rows = make_correction_data(world, engine=target_engine, tokenizer=target_tokenizer, limit=limit)
    cfg = AlignerConfig.from_dict({**settings, "seed": seed, "backend": backend, "save_strategy": "no",
                                   "logging_steps": 10, "report_to": "none", "overwrite_output_dir": True,
                                   "output_dir": str(output_dir)})
    trainer = AlignerTrainer(cfg, AutoModelForCausalLM.from_pretrained(world.target_path), target_tokenizer,
                             train_dataset=rows, callbacks=[SFTProgressCallback("Aligner SFT", always=always)])
    trainer.train()
    trainer.save_model(output_dir / "final")
    corrector = trainer.corrector(max_new_tokens=world.demo_config["target_max_new_tokens"])
    columns = {k: [r[k] for r in world.eval_prompts] for k in world.eval_prompts[0] if k != "prompt"}
    return arm_eval.with_corrector(NAME, environment, corrector, baseline.prompts, columns,
                                   answers=baseline.answers, seed=seed)


class SFTProgressCallback(ProgressCallback):
    """The PPO progress bar, showing the SFT loss instead of score and KL."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix({"loss": f"{logs['loss']:.4f}"}, refresh=False)
