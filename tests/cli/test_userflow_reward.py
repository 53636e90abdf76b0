"""A reward model from a run file: reward.label_index picks the logit; a checkpoint without a score head is refused."""

import pytest

from alignfast.cli.errors import CLIError
from tests.trainer.tiny import WORDS, make_causal_lm, make_reward_model, make_tokenizer


def test_reward_label_index_reaches_the_reward_model(tmp_path):
    from alignfast.cli import build
    from alignfast.cli.config import load_run_config
    from alignfast.rollout.rewards import WeightedRewards
    from alignfast.trainer.base import build_rewards

    config = load_run_config(None, ["--reward.model", "rm", "--reward.label_index", "2"],
                             trainer_fields=build.trainer_fields())
    cfg = build.trainer_config(config)
    assert cfg.reward_label_index == 2
    tok = make_tokenizer(tmp_path / "tok", WORDS, chat_template=False)
    rm = make_reward_model(tmp_path / "rm", len(tok), num_labels=3)
    rewards = build_rewards(cfg, reward_model=rm, reward_tokenizer=tok, reward_funcs=None, reward_weights=None,
                            device="cpu")
    assert isinstance(rewards, WeightedRewards) and rewards.funcs[0].label_index == 2


def test_a_causal_lm_as_reward_model_is_refused_naming_reward_model(tmp_path):
    from alignfast.cli.models import load_reward_model

    tok = make_tokenizer(tmp_path / "tok", WORDS)
    make_causal_lm(tmp_path / "lm", len(tok))
    with pytest.raises(CLIError, match=r"^reward.model '.*lm' has no trained score head \(score.weight"):
        load_reward_model({"model": str(tmp_path / "lm")})
    make_reward_model(tmp_path / "rm", len(tok))
    assert load_reward_model({"model": str(tmp_path / "rm")}).config.num_labels == 1


@pytest.mark.parametrize("role, section", [("prompter", "prompter"), ("reward model", "reward")])
def test_a_model_folder_without_a_tokenizer_says_so_and_names_the_setting(tmp_path, role, section):
    from alignfast.cli.models import load_tokenizer

    tok = make_tokenizer(tmp_path / "tok", WORDS)
    make_causal_lm(tmp_path / "lm", len(tok))  # no tokenizer saved beside it
    with pytest.raises(CLIError, match=rf"^cannot load the {role} tokenizer: .*lm holds no tokenizer files "
                                       rf"\(tokenizer.json, .*\): point {section}.tokenizer at"):
        load_tokenizer({"model": str(tmp_path / "lm")}, role)
    assert len(load_tokenizer({"model": str(tmp_path / "lm"), "tokenizer": str(tmp_path / "tok")}, role)) == len(tok)
