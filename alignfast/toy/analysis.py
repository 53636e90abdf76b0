"""Measure the toy world without any RL: how much reward there is to gain, and what λ leaves of it.

With the frozen target greedy, R(x, x') = r(x, πF(x')) is a deterministic function of the rewrite.
For each held-out prompt x we sample K rewrites x'_1..K ~ ρsft(·|x) (temperature 1) and report

    No fine-tuning     r(x, πF(x))                      the target answering the original prompt
    SFT prompter       mean_k R(x, x'_k)                 E_ρsft[R]
    best in support    max_k R(x, x'_k)                  what a perfect choice among ρsft's samples gets
    ρ*_λ               Σ_k w_k R(x, x'_k) / Σ_k w_k,     w_k = exp(R(x, x'_k)/λ)

The last is the self-normalised importance-sampling estimate of E_ρ*[R] for the KL-regularised optimum
ρ*(x'|x) ∝ ρsft(x'|x)·exp(R(x, x')/λ) (samples from ρsft, target ρ*, so the weights are exp(R/λ)).
Alongside: KL(ρ*‖ρsft) ≈ Σ_k w̃_k log(K w̃_k) with w̃ = w/Σw, and the win rate of ρ* against No
fine-tuning (ties count one half). It is only as good as the K samples: mass ρsft puts outside them
is invisible, so the estimate is a lower bound on what ρ* can reach and biased towards ρsft for small λ.

    python -m alignfast.toy.analysis [--assets DIR] [--samples K] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import defaultdict
from pathlib import Path

import torch

from alignfast.toy.generation import generate
from alignfast.toy.reward import answer_accuracy, position_accuracy
from alignfast.toy.tasks import (
    EXPLICIT_PHRASINGS,
    OPERATIONS,
    TASKS,
    answer_text,
    explicit_prompt,
    parse_terse,
    sample_numbers,
)

LAMBDAS = (0.02, 0.05, 0.1, 0.2, 0.5)
TARGET_MAX_NEW_TOKENS = 8
REWRITE_MAX_NEW_TOKENS = 16


def load_models(assets: str | Path | None = None):
    """(world, prompter, target, tokenizer) loaded through transformers' Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignfast.toy.world import load_world

    world = load_world(assets)
    prompter = AutoModelForCausalLM.from_pretrained(world.prompter_path).eval()
    target = AutoModelForCausalLM.from_pretrained(world.target_path).eval()
    return world, prompter, target, AutoTokenizer.from_pretrained(world.target_path)


def classify_rewrite(prompt: str, rewrite: str) -> str:
    """'copy' (x' == x), 'intended' (an explicit phrasing of what x means), 'wrong' (an explicit phrasing
    of another operation on the same numbers) or 'other' (anything else, e.g. a mangled list)."""
    task, numbers = parse_terse(prompt)
    if rewrite.split() == prompt.split():
        return "copy"
    for operation, phrasings in EXPLICIT_PHRASINGS.items():
        for variant in range(len(phrasings)):
            if rewrite.split() == explicit_prompt(operation, numbers, variant).split():
                return "intended" if operation == task.intended else "wrong"
    return "other"


def target_answers(target, tokenizer, messages: list[str]) -> dict[str, str]:
    """Greedy target answer for each distinct message."""
    unique = sorted(set(messages))
    replies = generate(target, tokenizer, unique, max_new_tokens=TARGET_MAX_NEW_TOKENS)
    return {m: r[0] for m, r in zip(unique, replies)}


def world_checks(assets: str | Path | None = None, *, lists_per_case: int = 60, seed: int = 0) -> dict:
    """The properties the world is built to have, on held-out lists (greedy target, ρsft at temperature 1):
    target exact-answer rate on explicit phrasings vs terse commands, and how ρsft rewrites."""
    _, prompter, target, tokenizer = load_models(assets)
    rng = random.Random(seed)
    explicit, terse = [], []
    for operation, phrasings in EXPLICIT_PHRASINGS.items():
        for variant in range(len(phrasings)):
            for _ in range(lists_per_case):
                numbers = sample_numbers(rng, held_out=True)
                explicit.append((explicit_prompt(operation, numbers, variant), answer_text(operation, numbers)))
    for task in TASKS:
        for _ in range(lists_per_case):
            numbers = sample_numbers(rng, held_out=True)
            terse.append((f"{task.word} {' '.join(map(str, numbers))}", answer_text(task.intended, numbers)))
    answers = target_answers(target, tokenizer, [m for m, _ in explicit + terse])

    def exact(cases):
        return sum(answers[m] == a for m, a in cases) / len(cases)

    prompts = [m for m, _ in terse]
    rewrites = generate(prompter, tokenizer, [_rewrite_message(p) for p in prompts],
                        max_new_tokens=REWRITE_MAX_NEW_TOKENS, temperature=1.0, num_samples=8, seed=seed)
    kinds = defaultdict(int)
    for prompt, samples in zip(prompts, rewrites):
        for rewrite in samples:
            kinds[classify_rewrite(prompt, rewrite)] += 1
    total = sum(kinds.values())
    return {
        "target_exact_explicit": round(exact(explicit), 4),
        "target_exact_terse": round(exact(terse), 4),
        "sft_rewrite_kinds": {k: round(kinds[k] / total, 4) for k in ("copy", "intended", "wrong", "other")},
    }


def _rewrite_message(prompt: str) -> str:
    from alignfast.toy.tokenizer import REWRITE_TEMPLATE

    return REWRITE_TEMPLATE.format(prompt=prompt)


def _optimum_weights(rewards: list[float], lam: float) -> list[float]:
    """Self-normalised importance weights of ρ* ∝ ρsft·exp(R/λ) over samples from ρsft (max-shifted)."""
    top = max(rewards)
    weights = [math.exp((r - top) / lam) for r in rewards]
    total = sum(weights)
    return [w / total for w in weights]


def _optimum(rewards: list[float], weights: list[float]) -> tuple[float, float]:
    """(E_ρ*[R], KL(ρ*‖ρsft)) from the weights of _optimum_weights."""
    expected = sum(w * r for w, r in zip(weights, rewards))
    kl = sum(w * math.log(len(rewards) * w) for w in weights if w > 0)
    return expected, kl


def _win(rewards: list[float], weights: list[float], baseline: float) -> float:
    return sum(w * (1.0 if r > baseline else 0.5 if r == baseline else 0.0) for r, w in zip(rewards, weights))


def analyse(assets: str | Path | None = None, *, num_samples: int = 32, lambdas=LAMBDAS, seed: int = 0,
            prompts: list[dict] | None = None) -> dict:
    """The table of the module docstring over the world's held-out prompts, overall and per task."""
    world, prompter, target, tokenizer = load_models(assets)
    rows = prompts if prompts is not None else world.eval_prompts
    xs = [row["prompt"] for row in rows]
    samples = generate(prompter, tokenizer, [world.rewrite_template.format(prompt=x) for x in xs],
                       max_new_tokens=REWRITE_MAX_NEW_TOKENS, temperature=1.0, num_samples=num_samples, seed=seed)
    answers = target_answers(target, tokenizer, xs + [r for group in samples for r in group])

    per_prompt = []
    for row, x, group in zip(rows, xs, samples):
        baseline = answer_accuracy([x], [answers[x]], answer=[row["answer"]])[0]
        rewards = [position_accuracy(answers[r], row["answer"]) for r in group]
        entry = {"task": parse_terse(x)[0].word, "no_fine_tuning": baseline,
                 "sft": sum(rewards) / len(rewards), "best_in_support": max(rewards),
                 "sft_copy_rate": sum(classify_rewrite(x, r) == "copy" for r in group) / len(group)}
        for lam in lambdas:
            weights = _optimum_weights(rewards, lam)
            entry[f"optimum_reward@{lam}"], entry[f"optimum_kl@{lam}"] = _optimum(rewards, weights)
            entry[f"optimum_win_rate@{lam}"] = _win(rewards, weights, baseline)
        entry["sft_win_rate"] = _win(rewards, [1 / len(rewards)] * len(rewards), baseline)
        per_prompt.append(entry)

    def mean_of(entries):
        keys = [k for k in entries[0] if k != "task"]
        return {k: round(sum(e[k] for e in entries) / len(entries), 4) for k in keys}

    by_task = defaultdict(list)
    for entry in per_prompt:
        by_task[entry["task"]].append(entry)
    return {"num_prompts": len(rows), "num_samples": num_samples, "seed": seed, "overall": mean_of(per_prompt),
            "per_task": {task: mean_of(entries) for task, entries in by_task.items()}}


def format_report(result: dict, lambdas=LAMBDAS) -> str:
    """The analysis as a Markdown table: one row per arm, one column per task plus the overall mean."""
    tasks = list(result["per_task"])
    header = "| | all | " + " | ".join(tasks) + " |\n|---|---|" + "---|" * len(tasks)
    arms = [("No fine-tuning (target on x)", "no_fine_tuning"), ("SFT prompter ρsft", "sft"),
            ("best of ρsft's samples", "best_in_support")]
    arms += [(f"ρ* at λ={lam}", f"optimum_reward@{lam}") for lam in lambdas]
    arms += [(f"KL(ρ*‖ρsft) at λ={lam}", f"optimum_kl@{lam}") for lam in lambdas]
    arms += [("win rate ρsft vs No fine-tuning", "sft_win_rate")]
    arms += [(f"win rate ρ* at λ={lam} vs No fine-tuning", f"optimum_win_rate@{lam}") for lam in lambdas]
    arms += [("ρsft copy rate", "sft_copy_rate")]
    lines = [header]
    for label, key in arms:
        cells = [result["overall"][key]] + [result["per_task"][t][key] for t in tasks]
        lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alignfast.toy.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=None, help="world folder (default: the shipped assets)")
    parser.add_argument("--samples", type=int, default=32, help="rewrites sampled from ρsft per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    result = analyse(args.assets, num_samples=args.samples, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['num_prompts']} held-out prompts, {result['num_samples']} ρsft samples each, seed {result['seed']}")
        print(json.dumps(world_checks(args.assets), indent=2))
        print(format_report(result))


if __name__ == "__main__":
    main()
