"""The shipped world: its assets load through transformers' real loading code and have the properties
the demo relies on (greedy target; ρsft sampled at temperature 1; held-out lists only)."""

import random
from pathlib import Path

import pytest
import torch

from alignfast.toy import DEMO_CONFIG, load_world
from alignfast.toy.analysis import classify_rewrite
from alignfast.toy.generation import generate
from alignfast.toy.reward import answer_accuracy
from alignfast.toy.tasks import EXPLICIT_PHRASINGS, TASKS, answer_text, explicit_prompt, sample_numbers, terse_prompt


@pytest.fixture(scope="module")
def world():
    return load_world()


@pytest.fixture(scope="module")
def models(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompter = AutoModelForCausalLM.from_pretrained(world.prompter_path)
    target = AutoModelForCausalLM.from_pretrained(world.target_path)
    return prompter, target, AutoTokenizer.from_pretrained(world.prompter_path)


def test_assets_load_through_auto_classes(world, models):
    from transformers import AutoTokenizer, LlamaForCausalLM

    prompter, target, tokenizer = models
    assert isinstance(prompter, LlamaForCausalLM) and isinstance(target, LlamaForCausalLM)
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.chat_template and "{prompt}" in world.rewrite_template
    assert AutoTokenizer.from_pretrained(world.target_path).get_vocab() == tokenizer.get_vocab()
    assert target.config.vocab_size == prompter.config.vocab_size == len(tokenizer)
    assert target.config.eos_token_id == tokenizer.eos_token_id


def test_assets_are_small_and_inside_the_package(world):
    package = Path(__import__("alignfast.toy", fromlist=["_"]).__file__).parent
    for path in (world.prompter_path, world.target_path):
        assert Path(path).resolve().is_relative_to(package)
    total = sum(f.stat().st_size for f in (package / "assets").rglob("*") if f.is_file())
    assert total < 5 * 2**20, f"{total} bytes"


def test_world_rows_and_config(world):
    assert len(world.train_prompts) >= 1000 and len(world.eval_prompts) >= 200
    assert not {r["prompt"] for r in world.train_prompts} & {r["prompt"] for r in world.eval_prompts}
    rows = world.eval_prompts[:10]
    reward = world.reward_funcs[0]
    assert reward([r["prompt"] for r in rows], [r["answer"] for r in rows], answer=[r["answer"] for r in rows]) == \
        [1.0] * 10
    assert "{rewrite}" in world.target_prompt_template and len(world.reward_weights) == len(world.reward_funcs)
    assert DEMO_CONFIG["response_length"] >= 14 and DEMO_CONFIG["target_max_new_tokens"] >= 6
    assert world.demo_config == DEMO_CONFIG and world.demo_config is not DEMO_CONFIG


def test_missing_assets_say_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="alignfast.toy.build"):
        load_world(tmp_path)


def _exact_rate(target, tokenizer, cases):
    replies = generate(target, tokenizer, [m for m, _ in cases], max_new_tokens=8)
    return sum(r[0] == a for r, (_, a) in zip(replies, cases)) / len(cases)


def test_target_answers_explicit_phrasings_and_misreads_terse_ones(models):
    _, target, tokenizer = models
    rng = random.Random(1)
    explicit, terse = [], []
    for _ in range(12):
        for operation, phrasings in EXPLICIT_PHRASINGS.items():
            numbers = sample_numbers(rng, held_out=True)
            variant = rng.randrange(len(phrasings))
            explicit.append((explicit_prompt(operation, numbers, variant), answer_text(operation, numbers)))
        for task in TASKS:
            numbers = sample_numbers(rng, held_out=True)
            terse.append((terse_prompt(task, numbers), answer_text(task.intended, numbers)))
    explicit_rate, terse_rate = _exact_rate(target, tokenizer, explicit), _exact_rate(target, tokenizer, terse)
    assert explicit_rate >= 0.95, explicit_rate
    assert terse_rate <= 0.6 and explicit_rate - terse_rate >= 0.4, (explicit_rate, terse_rate)


def test_target_habit_on_terse_sort_is_descending(models):
    _, target, tokenizer = models
    rng = random.Random(2)
    lists = [sample_numbers(rng, held_out=True) for _ in range(20)]
    replies = generate(target, tokenizer, [terse_prompt(TASKS[0], n) for n in lists], max_new_tokens=8)
    assert sum(r[0] == answer_text("descending", n) for r, n in zip(replies, lists)) >= 15


def test_sft_prompter_mostly_copies_but_has_mass_elsewhere(world, models):
    prompter, _, tokenizer = models
    rows = world.eval_prompts[:60]
    samples = generate(prompter, tokenizer, [world.rewrite_template.format(prompt=r["prompt"]) for r in rows],
                       max_new_tokens=16, temperature=1.0, num_samples=8, seed=0)
    kinds = [classify_rewrite(r["prompt"], s) for r, group in zip(rows, samples) for s in group]
    share = {k: kinds.count(k) / len(kinds) for k in ("copy", "intended", "wrong", "other")}
    assert 0.45 <= share["copy"] <= 0.8, share
    assert share["intended"] >= 0.05 and share["wrong"] >= 0.05, share
    assert share["other"] <= 0.1, share
    greedy = generate(prompter, tokenizer, [world.rewrite_template.format(prompt=r["prompt"]) for r in rows],
                      max_new_tokens=16)
    assert sum(g[0] == r["prompt"] for g, r in zip(greedy, rows)) >= 0.9 * len(rows)


def test_generation_is_deterministic_under_a_seed(world, models):
    prompter, _, tokenizer = models
    messages = [world.rewrite_template.format(prompt=r["prompt"]) for r in world.eval_prompts[:16]]
    first = generate(prompter, tokenizer, messages, max_new_tokens=16, temperature=1.0, num_samples=4, seed=7)
    torch.manual_seed(123)  # the global RNG state must not matter
    again = generate(prompter, tokenizer, messages, max_new_tokens=16, temperature=1.0, num_samples=4, seed=7)
    other = generate(prompter, tokenizer, messages, max_new_tokens=16, temperature=1.0, num_samples=4, seed=8)
    assert first == again
    assert first != other


def test_reward_of_target_answers_on_original_prompts(world, models):
    _, target, tokenizer = models
    rows = [r for r in world.eval_prompts if r["task"] == "sort"][:10]
    replies = generate(target, tokenizer, [r["prompt"] for r in rows], max_new_tokens=8)
    direct = answer_accuracy([r["prompt"] for r in rows], [g[0] for g in replies], answer=[r["answer"] for r in rows])
    explicit = generate(target, tokenizer, [explicit_prompt("ascending", [int(w) for w in r["prompt"].split()[1:]])
                                            for r in rows], max_new_tokens=8)
    helped = answer_accuracy([r["prompt"] for r in rows], [g[0] for g in explicit], answer=[r["answer"] for r in rows])
    assert sum(helped) / len(helped) >= 0.95 > 0.6 >= sum(direct) / len(direct)


def test_demo_config_is_a_valid_trainer_config(world):
    trainer = pytest.importorskip("alignfast.trainer")
    if not hasattr(trainer, "AlignProConfig"):
        pytest.skip("the trainer has not landed on this branch")
    common = dict(rewrite_template=world.rewrite_template, target_prompt_template=world.target_prompt_template)
    align_pro = trainer.AlignProConfig(**world.demo_config, **common)
    oracle = trainer.AlignProConfig(**{**world.demo_config, **world.oracle_overrides}, **common)
    assert align_pro.kl_coef == world.demo_config["kl_coef"] and oracle.response_length == 8
    assert align_pro.num_steps(len(world.train_prompts)) >= 10
