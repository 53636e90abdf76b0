"""The toy world as one object: where its models are, its reward, its prompts, and how to train on it.

    world = load_world()
    AutoModelForCausalLM.from_pretrained(world.prompter_path)   # ρsft (also the prompter's start)
    AutoModelForCausalLM.from_pretrained(world.target_path)     # the frozen target
    world.reward_funcs[0](prompts, completions, answer=[...])   # r(x, y) on the original x

Both model folders carry the same word-level tokenizer with its chat template. The prompter's input is
its chat template around rewrite_template.format(prompt=x); the target's input is its chat template
around target_prompt_template.format(rewrite=x') (just the rewrite).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alignfast.toy.reward import answer_accuracy
from alignfast.toy.tasks import make_prompts
from alignfast.toy.tokenizer import REWRITE_TEMPLATE

ASSETS = Path(__file__).resolve().parent / "assets"
TRAIN_PROMPTS, TRAIN_SEED = 2000, 11
EVAL_PROMPTS, EVAL_SEED = 250, 12
TARGET_PROMPT_TEMPLATE = "{rewrite}"

# Trainer config fields (TRL PPOConfig names plus the target_* fields of AlignProConfig) that the demo
# uses on this world. kl_coef from alignfast.toy.analysis: at λ = 0.05 the KL-regularised optimum keeps
# all of the headroom (E_ρ*[R] ≈ 1.0 at KL(ρ*‖ρsft) ≈ 1.3 nats). learning_rate from short PPO runs:
# 1e-3 jumps (approx-KL > 2 in the first steps), 1e-4 is still climbing after 50 steps, 3e-4 reaches the
# optimum in ~30 steps for seeds 0-3. total_episodes: 50 PPO steps of 64 episodes. Numbers: README.md.
DEMO_CONFIG: dict = {
    "kl_coef": 0.05,
    "learning_rate": 3e-4,
    "temperature": 1.0,
    "response_length": 16,
    "missing_eos_penalty": 1.0,
    "num_ppo_epochs": 4,
    "num_mini_batches": 2,
    "per_device_train_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "total_episodes": 3200,
    "cliprange": 0.2,
    "vf_coef": 0.1,
    "gamma": 1.0,
    "lam": 0.95,
    "whiten_rewards": False,
    "seed": 0,
    "target_max_new_tokens": 8,
    "target_temperature": 0.0,
    "target_num_samples": 1,
}

# What changes for the Oracle arm (PPO on the target itself): its policy writes answers, not rewrites.
ORACLE_OVERRIDES: dict = {"response_length": DEMO_CONFIG["target_max_new_tokens"]}


@dataclass(frozen=True)
class ToyWorld:
    """Everything `alignfast demo` needs. Prompt rows are {"prompt": x, "answer": true answer, "task": word};
    reward functions take (prompts, completions, **columns) and read the "answer" column. demo_config:
    AlignProConfig fields for the Align-Pro arm; demo_config | oracle_overrides for the Oracle arm."""

    prompter_path: str
    target_path: str
    reward_funcs: list[Callable]
    train_prompts: list[dict]
    eval_prompts: list[dict]
    rewrite_template: str = REWRITE_TEMPLATE
    target_prompt_template: str = TARGET_PROMPT_TEMPLATE
    demo_config: dict = field(default_factory=lambda: dict(DEMO_CONFIG))
    oracle_overrides: dict = field(default_factory=lambda: dict(ORACLE_OVERRIDES))
    reward_weights: list[float] = field(default_factory=lambda: [1.0])


def load_world(assets: str | Path | None = None) -> ToyWorld:
    """The toy world whose models live in `assets` (default: the ones shipped with the package)."""
    root = Path(assets) if assets is not None else ASSETS
    for name in ("prompter", "target"):
        if not (root / name / "config.json").is_file():
            raise FileNotFoundError(
                f"toy world assets: no {name} model in {root} (build it: python -m alignfast.toy.build --out {root})")
    return ToyWorld(
        prompter_path=str(root / "prompter"), target_path=str(root / "target"),
        reward_funcs=[answer_accuracy],
        train_prompts=make_prompts(TRAIN_PROMPTS, seed=TRAIN_SEED, held_out=False),
        eval_prompts=make_prompts(EVAL_PROMPTS, seed=EVAL_SEED, held_out=True))
