"""Build the toy world's models from fixed seeds: `python -m alignfast.toy.build [--out DIR]`.

Trains the frozen target and the SFT prompter by supervised learning on the corpora of
alignfast.toy.corpus and writes, under DIR (default: the package's assets/ folder):

    target/     config.json, model.safetensors, generation_config.json, tokenizer files, chat template
    prompter/   the same for the SFT prompter ρsft
    build.json  seeds, steps, shapes, losses and the checks below (what was built, how, and how well)

Then checks what the world needs (on held-out lists, greedy): the target answers explicit phrasings
right and terse commands mostly wrong; the prompter copies terse commands most of the time.
Bitwise equality across machines is not promised (float reductions differ); the properties are.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from alignfast.toy import corpus
from alignfast.toy.configs import PROMPTER_SHAPE, TARGET_SHAPE, prompter_config, target_config
from alignfast.toy.supervised import train_supervised
from alignfast.toy.tokenizer import build_tokenizer, save_tokenizer

ASSETS = Path(__file__).resolve().parent / "assets"

# What the build trains with: seeds, steps, batch size, peak learning rate.
RECIPE = {
    "target": dict(init_seed=1234, data_seed=1, steps=1500, batch_size=128, learning_rate=3e-3),
    "prompter": dict(init_seed=4321, data_seed=2, steps=1000, batch_size=128, learning_rate=3e-3),
}


def _train_model(name: str, tokenizer, config, sampler, recipe: dict, out: Path, log) -> dict:
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(recipe["init_seed"])
    model = LlamaForCausalLM(config)
    log(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, {recipe['steps']} steps")
    start = time.perf_counter()
    losses = train_supervised(model, tokenizer, sampler, steps=recipe["steps"], batch_size=recipe["batch_size"],
                              learning_rate=recipe["learning_rate"], seed=recipe["data_seed"],
                              log_every=max(1, recipe["steps"] // 10), log=log)
    seconds = time.perf_counter() - start
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model.save_pretrained(out / name)
    save_tokenizer(tokenizer, out / name)
    for path in (out / name).iterdir():
        path.chmod(0o644)  # safetensors writes 0600; installed package data must be world-readable
    return {"final_loss": sum(losses[-50:]) / len(losses[-50:]), "train_seconds": round(seconds, 1), **recipe}


def build(out: Path = ASSETS, log=print) -> dict:
    """Train both models into `out` and return the build record (also written to out/build.json)."""
    from alignfast.toy.analysis import world_checks

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    record = {"vocab_size": len(tokenizer), "target_shape": TARGET_SHAPE, "prompter_shape": PROMPTER_SHAPE,
              "torch": torch.__version__}
    record["target"] = _train_model("target", tokenizer, target_config(tokenizer), corpus.sample_target_example,
                                    RECIPE["target"], out, log)
    record["prompter"] = _train_model("prompter", tokenizer, prompter_config(tokenizer),
                                      corpus.sample_prompter_example, RECIPE["prompter"], out, log)
    record["checks"] = world_checks(out)
    log(json.dumps(record["checks"], indent=2))
    (out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alignfast.toy.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help=f"output folder (default: {ASSETS})")
    args = parser.parse_args(argv)
    random.seed(0)
    build(args.out)


if __name__ == "__main__":
    main()
