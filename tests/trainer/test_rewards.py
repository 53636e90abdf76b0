"""Rewards: GRPO-style functions weighted and combined, the reward-model wrapper, template filling."""

import pytest
import torch

from alignfast.ops._checks import AlignfastArgumentError
from alignfast.rollout import templates
from alignfast.rollout.rewards import RewardModel, WeightedRewards
from tests.trainer.tiny import WORDS, make_reward_model, make_tokenizer


def length(prompts, completions, **columns):
    return [float(len(c.split())) for c in completions]


def only_cats(prompts, completions, **columns):
    return [1.0 if "cat" in p else None for p in prompts]


def test_weighted_sum_skips_none():
    rewards = WeightedRewards([length, only_cats, length], [0.5, 2.0, -1.0])
    assert rewards.names == ["length", "only_cats", "length_1"]
    out = rewards(["a cat", "a dog"], ["x y z", "x"])
    assert out.total == [0.5 * 3 + 2.0 - 3, 0.5 - 1]
    assert out.per_func["only_cats"] == [1.0, None]


def test_reward_errors_name_the_culprit():
    with pytest.raises(AlignfastArgumentError, match="'reward_weights' has 1 entries for 2"):
        WeightedRewards([length, only_cats], [1.0])
    with pytest.raises(AlignfastArgumentError, match="not callable"):
        WeightedRewards(["length"])
    with pytest.raises(AlignfastArgumentError, match="'bad' returned 1 scores for 2"):
        def bad(prompts, completions, **kw):
            return [0.0]
        WeightedRewards([bad])(["a", "b"], ["c", "d"])
    with pytest.raises(AlignfastArgumentError, match="every reward function returned None for completion 1"):
        WeightedRewards([only_cats])(["cat", "dog"], ["c", "d"])


@pytest.mark.parametrize("chat", [True, False])
def test_reward_model_scores_the_exchange(tmp_path, chat):
    tok = make_tokenizer(tmp_path / "rm", WORDS, chat_template=chat)
    model = make_reward_model(tmp_path / "rm", len(tok), seed=1, hidden=16, initializer_range=0.5)
    rm = RewardModel(model, tok, template="{prompt} answer {completion}", batch_size=2)
    prompts = ["what is a cat", "why fish", "a dog"]
    completions = ["the cat", "fish is a fish please", "dog"]
    got = rm(prompts, completions)
    for p, c, score in zip(prompts, completions, got):
        text = (tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                        tokenize=False) if chat else f"{p} answer {c}")
        ids = tok(text, add_special_tokens=not chat, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = model(input_ids=ids).logits[0, 0].item()
        assert abs(score - want) < 1e-5
    assert len(set(got)) == 3
    assert rm.__name__ == "rm"


def test_reward_model_scores_do_not_depend_on_the_batch_when_pad_ids_differ(tmp_path):
    """Rows were padded with the tokenizer's pad id while the classifier pools the last token that is not
    config.pad_token_id: with the two different, a short row batched beside a longer one was scored at a pad,
    so its score changed with the batch. Rows are now padded with the model's pad id."""
    tok = make_tokenizer(tmp_path / "rm", WORDS, chat_template=False)
    model = make_reward_model(tmp_path / "rm", len(tok), seed=1, hidden=16, initializer_range=0.5)
    tok.pad_token = "<eos>"  # the tokenizer pads with 2; the model's config says 0
    assert (tok.pad_token_id, model.config.pad_token_id) == (2, 0)
    rm = RewardModel(model, tok, template="{prompt} answer {completion}", batch_size=8)
    prompts, completions = ["what is a cat", "a dog"], ["the cat is a cat and a fish please", "dog"]
    batched = rm(prompts, completions)
    alone = [rm([p], [c])[0] for p, c in zip(prompts, completions)]
    assert batched == pytest.approx(alone, abs=1e-5)
    model.config.pad_token_id = -1
    with pytest.raises(AlignfastArgumentError, match=r"'reward_model' has config.pad_token_id -1, which is not"):
        RewardModel(model, tok)


def test_render_is_single_pass_and_leaves_other_braces():
    assert templates.render("{prompt} -> {rewrite} {json}", prompt="say {rewrite}", rewrite="R") == \
        "say {rewrite} -> R {json}"
    assert templates.target_requests("Q: {prompt} / {rewrite}", ["x"], ["y"]) == ["Q: x / y"]
    assert templates.rewrite_instructions("improve: {prompt}", ["a {b}"]) == ["improve: a {b}"]


def test_reward_model_label_choice_and_truncation(tmp_path):
    tok = make_tokenizer(tmp_path / "rm", WORDS, chat_template=False)
    two = make_reward_model(tmp_path / "rm", len(tok), seed=2, hidden=16, num_labels=2)
    with pytest.raises(AlignfastArgumentError, match="'label_index' must say which of the reward model's 2"):
        RewardModel(two, tok)
    with pytest.raises(AlignfastArgumentError, match="'label_index' \\(2\\) must be in \\[0, 2\\)"):
        RewardModel(two, tok, label_index=2)
    rm = RewardModel(two, tok, label_index=1, max_length=3)
    ids = tok("what is a cat\nthe cat is a cat")["input_ids"][-3:]
    with torch.no_grad():
        want = two(input_ids=torch.tensor([ids])).logits[0, 1].item()
    assert abs(rm(["what is a cat"], ["the cat is a cat"])[0] - want) < 1e-5
    # A path object loads like a path string (it was taken for a model object: AttributeError on .config).
    from_path = RewardModel(tmp_path / "rm", label_index=1, max_length=3)
    assert from_path(["what is a cat"], ["the cat is a cat"]) == rm(["what is a cat"], ["the cat is a cat"])


def test_an_exchange_of_no_token_is_refused_naming_the_template(tmp_path):
    """A row of no token is all pads: the classifier pooled a pad (its score depended on the batch's width, and it was
    NaN under float64 eager attention, whose pad row sees no key). It is refused naming reward_template."""
    tok = make_tokenizer(tmp_path / "rm", WORDS, chat_template=False)
    model = make_reward_model(tmp_path / "rm", len(tok), seed=1, hidden=16)
    assert tok("", add_special_tokens=True)["input_ids"] == []
    rm = RewardModel(model, tok, template="{prompt}{completion}")
    with pytest.raises(AlignfastArgumentError, match=r"'reward_template' renders exchange 1 \(prompt '', completion "
                                                     r"''\) to text of no token \(''\): there is nothing"):
        rm(["a cat", ""], ["the cat", ""])
    assert len(rm(["a cat", ""], ["the cat", "dog"])) == 2
