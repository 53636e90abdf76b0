"""Correction data for the Aligner on the toy world: what the frozen target answered, and what it should have.

Each training prompt x (a terse command) gives one row

    {"question": x, "answer": y0 = the target's greedy answer to x, "correction": the true answer of x, "task"}

Where the target is already right (most `reverse` commands, lists whose first/last digit is the max/min)
the row is an identity row (correction == answer): the corrector must learn to leave those alone, as
the paper's identity data teaches. The corrector reads CORRECTION_TEMPLATE in the world's own words, as a
user turn of the toy chat template (the toy tokenizer has no word for the paper's English template).
"""

from __future__ import annotations

from collections.abc import Sequence

CORRECTION_TEMPLATE = "{question} : {answer}"

# AlignerConfig fields for the demo's Aligner row: 80 steps of 32 rows (1.3 passes over the 2000 rows). Short
# runs on seed 0: lr 1e-3 x 60 steps -> 0.886 held-out reward, 1e-3 x 100 -> 0.947, 2e-3 x 80 -> 0.943
# (No fine-tuning: 0.439); 150 steps at 1e-3 reached 0.996 at twice the cost.
ALIGNER_DEMO_CONFIG: dict = {
    "template": CORRECTION_TEMPLATE,
    "use_chat_template": True,
    "max_length": 64,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.05,
    "per_device_train_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "max_steps": 80,
    "identity_ratio": 0.0,
}


def target_answers(engine, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 8,
                   batch_size: int = 256) -> list[str]:
    """The frozen target's greedy answers to the prompts as they are (the No fine-tuning answers)."""
    from alignfast.trainer.environments import AlignProEnvironment

    env = AlignProEnvironment(engine, None, target_tokenizer=tokenizer, rewrite_template="{prompt}",
                              max_new_tokens=max_new_tokens, batch_size=batch_size)
    answers, _ = env.answer(list(prompts), seed=0)
    return [a[0] if a else "" for a in answers]


def correction_rows(prompt_rows: Sequence[dict], answers: Sequence[str]) -> list[dict]:
    """Rows {question, answer, correction, task} from toy prompt rows {prompt, answer (true), task} and the
    target's answers to them."""
    if len(prompt_rows) != len(answers):
        raise ValueError(f"alignfast: argument 'answers' has {len(answers)} entries for {len(prompt_rows)} prompts")
    return [{"question": r["prompt"], "answer": a, "correction": r["answer"], "task": r.get("task")}
            for r, a in zip(prompt_rows, answers)]


def make_correction_data(world=None, *, split: str = "train", engine=None, tokenizer=None,
                         limit: int | None = None) -> list[dict]:
    """The world's correction rows for its training (or eval) prompts (the first `limit` of them), from its
    target's greedy answers."""
    if split not in ("train", "eval"):
        raise ValueError(f"alignfast: argument 'split' must be 'train' or 'eval', got {split!r}")
    if world is None:
        from alignfast.toy import load_world

        world = load_world()
    if engine is None or tokenizer is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from alignfast.rollout import HFEngine

        tokenizer = AutoTokenizer.from_pretrained(world.target_path)
        target = AutoModelForCausalLM.from_pretrained(world.target_path).eval().requires_grad_(False)
        engine = HFEngine(target, tokenizer)
    rows = world.train_prompts if split == "train" else world.eval_prompts
    rows = rows[:limit] if limit is not None else rows
    return correction_rows(rows, target_answers(engine, tokenizer, [r["prompt"] for r in rows]))
