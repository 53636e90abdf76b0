"""What fits in each model's context: impossible settings are one-line errors, cut data a counted warning."""

import logging

import pytest

from alignfast.ops import AlignfastArgumentError
from tests.trainer.tiny import WORDS, echo_trainer, make_reward_model, make_tokenizer, small_world


def test_response_length_beyond_the_prompters_positions_is_refused(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    with pytest.raises(AlignfastArgumentError, match=r"argument 'response_length' \(300\) leaves no room for the "
                                                     r"prompter's input: its max_position_embeddings is 256"):
        echo_trainer(tok, prompter_dir, output_dir=str(tmp_path / "o"), response_length=300)
    with pytest.raises(AlignfastArgumentError, match=r"argument 'max_prompt_length' \(250\) plus response_length"):
        echo_trainer(tok, prompter_dir, output_dir=str(tmp_path / "o"), response_length=8, max_prompt_length=250)


def test_a_cut_prompter_input_is_counted_once(tmp_path, caplog):
    tok, prompter_dir = small_world(tmp_path)
    trainer, _ = echo_trainer(tok, prompter_dir, output_dir=str(tmp_path / "o"), response_length=2,
                              max_prompt_length=4, rewrite_template="rewrite please the answer about {prompt}")
    with caplog.at_level(logging.WARNING, logger="alignfast"):
        trainer.rollout(["what is a cat", "bird"])
        trainer.rollout(["what is a cat"])
    cut = [r.message for r in caplog.records if "keep their last" in r.message]
    assert len(cut) == 1 and cut[0].startswith("2 of 2 prompter's inputs are longer than 4 tokens")
    assert "rewrite instruction" in cut[0]


def test_another_models_tokenizer_is_refused_at_construction(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    big = make_tokenizer(tmp_path / "big", WORDS + [f"w{i}" for i in range(40)])
    with pytest.raises(AlignfastArgumentError, match=r"argument 'prompter_tokenizer' has 61 tokens but the "
                                                     r"prompter's input embeddings hold 21"):
        echo_trainer(big, prompter_dir, output_dir=str(tmp_path / "o"))


def test_the_reward_model_sees_the_end_of_a_long_exchange_with_a_warning(tmp_path, caplog):
    from alignfast.rollout.rewards import RewardModel

    tok = make_tokenizer(tmp_path / "tok", WORDS, chat_template=False)
    rm = RewardModel(make_reward_model(tmp_path / "rm", len(tok)), tok)
    long = " ".join(["cat"] * 400)
    with caplog.at_level(logging.WARNING, logger="alignfast"):
        scores = rm([long, "a"], ["dog", "cat"])
        rm([long], ["dog"])
    assert len(scores) == 2
    cut = [r.message for r in caplog.records if "keep their last" in r.message]
    assert len(cut) == 1 and cut[0].startswith("1 of 2 reward-model exchanges are longer than 256 tokens")
    big = make_tokenizer(tmp_path / "big", WORDS + [f"w{i}" for i in range(40)])
    with pytest.raises(AlignfastArgumentError, match="argument 'reward_tokenizer' has 61 tokens"):
        RewardModel(rm.model, big)
