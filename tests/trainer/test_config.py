"""AlignProConfig validation: bad values fail up front with an error naming the field."""

import pytest

from alignfast.ops._checks import AlignfastArgumentError
from alignfast.trainer import AlignProConfig, AlignProTrainer
from alignfast.trainer.config import DEFAULT_REWRITE_TEMPLATE


@pytest.mark.parametrize("field,value", [
    ("response_length", 0),
    ("response_length", -3),
    ("per_device_train_batch_size", 0),
    ("num_ppo_epochs", 1.5),
    ("learning_rate", 0.0),
    ("learning_rate", float("nan")),
    ("kl_coef", -0.1),
    ("kl_estimator", "k4"),
    ("cliprange", 0),
    ("gamma", 1.5),
    ("temperature", 0.0),
    ("top_p", 0.0),
    ("backend", "cuda"),
    ("value_head", "tied"),
    ("rewrite_template", "Rewrite: {query}"),
    ("target_prompt_template", "Answer: {prompt}"),
    ("reward_template", "{prompt}"),
    ("target_num_samples", 0),
    ("report_to", "mlflow"),
    ("missing_eos_penalty", -1.0),
    ("reward_weights", [1.0, float("inf")]),
    ("save_total_limit", 0),
    ("lr_scheduler_type", "exotic"),
    ("whiten_rewards", "false"),  # a quoted YAML string is truthy: never silently "on"
    ("overwrite_output_dir", 1),
])
def test_bad_value_names_the_field(field, value):
    with pytest.raises(AlignfastArgumentError, match=f"'{field}'"):
        AlignProConfig(**{field: value})


def test_batch_size_must_divide_into_micro_batches():
    with pytest.raises(AlignfastArgumentError, match="'batch_size'.*multiple of.*4 \\* 2 = 8"):
        AlignProConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, batch_size=12)
    cfg = AlignProConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, batch_size=32)
    assert cfg.num_mini_batches == 4 and cfg.rollout_batch_size == 32 and cfg.mini_batch_size == 8
    with pytest.raises(AlignfastArgumentError, match="'num_mini_batches'"):
        AlignProConfig(per_device_train_batch_size=4, batch_size=32, num_mini_batches=3)


def test_total_episodes_smaller_than_a_batch():
    with pytest.raises(AlignfastArgumentError, match="'total_episodes'"):
        AlignProConfig(per_device_train_batch_size=8, total_episodes=4)


def test_step_count_follows_trl():
    cfg = AlignProConfig(per_device_train_batch_size=4, num_mini_batches=2)  # 8 episodes per step
    assert cfg.num_steps(10) == 4  # ceil(3 epochs * 10 / 8)
    assert AlignProConfig(per_device_train_batch_size=4, total_episodes=20).num_steps(1000) == 5
    assert AlignProConfig(max_steps=7).num_steps(3) == 7


def test_from_dict_rejects_unknown_keys_with_a_suggestion():
    with pytest.raises(AlignfastArgumentError, match="unknown config key 'kl_coeff'; did you mean 'kl_coef'"):
        AlignProConfig.from_dict({"kl_coeff": 0.1})
    with pytest.raises(AlignfastArgumentError, match="unknown config key 'zzz'$"):
        AlignProConfig.from_dict({"zzz": 1})
    with pytest.raises(AlignfastArgumentError, match="mapping"):
        AlignProConfig.from_dict(["kl_coef"])


def test_round_trip_and_defaults_follow_trl():
    cfg = AlignProConfig(kl_coef=0.2, report_to=["tensorboard", "wandb"] and "none", batch_size=16)
    again = AlignProConfig.from_dict(cfg.to_dict())
    assert again == cfg
    d = AlignProConfig()
    trl_defaults = dict(kl_coef=0.05, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0,
                        lam=0.95, num_ppo_epochs=4, num_mini_batches=1, response_length=53, temperature=0.7,
                        missing_eos_penalty=None, whiten_rewards=False, learning_rate=5e-5,
                        per_device_train_batch_size=8, gradient_accumulation_steps=1, total_episodes=None,
                        local_rollout_forward_batch_size=64)
    for k, v in trl_defaults.items():
        assert getattr(d, k) == v, k
    assert "{prompt}" in DEFAULT_REWRITE_TEMPLATE


def test_trainer_rejects_bad_arguments(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.trainer.tiny import FunctionTarget, keyword_reward, small_world

    tok, prompter_dir = small_world(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(prompter_dir)
    cfg = AlignProConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1)
    target = FunctionTarget(lambda s: s, tok)
    with pytest.raises(AlignfastArgumentError, match="'target'"):
        AlignProTrainer(cfg, model, tok, 42, reward_funcs=[keyword_reward], train_dataset=["a"])
    with pytest.raises(AlignfastArgumentError, match="no reward"):
        AlignProTrainer(cfg, model, tok, target, train_dataset=["a"])
    with pytest.raises(AlignfastArgumentError, match="'reward_weights' has 2 entries for 1"):
        AlignProTrainer(cfg, model, tok, target, reward_funcs=[keyword_reward], reward_weights=[1, 2],
                        train_dataset=["a"])
    with pytest.raises(AlignfastArgumentError, match="'train_dataset'"):
        AlignProTrainer(cfg, model, tok, target, reward_funcs=[keyword_reward], train_dataset=[{"text": "a"}])
    with pytest.raises(AlignfastArgumentError, match="'train_dataset' is empty"):
        AlignProTrainer(cfg, model, tok, target, reward_funcs=[keyword_reward], train_dataset=[])
    with pytest.raises(AlignfastArgumentError, match="'config'"):
        AlignProTrainer(object(), model, tok, target, reward_funcs=[keyword_reward], train_dataset=["a"])
    with pytest.raises(AlignfastArgumentError, match="'prompter_tokenizer' is required"):
        AlignProTrainer(cfg, model, None, target, reward_funcs=[keyword_reward], train_dataset=["a"])


def test_target_max_new_tokens_must_fit_the_target(tmp_path):
    from transformers import AutoModelForCausalLM

    from alignfast.rollout import HFEngine
    from tests.trainer.tiny import keyword_reward, make_causal_lm, small_world

    tok, prompter_dir = small_world(tmp_path)
    target = make_causal_lm(tmp_path / "target", len(tok), seed=1)  # max_position_embeddings 256
    cfg = AlignProConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1,
                         target_max_new_tokens=256)
    with pytest.raises(AlignfastArgumentError, match="'target_max_new_tokens' \\(256\\) leaves no room .* 256"):
        AlignProTrainer(cfg, AutoModelForCausalLM.from_pretrained(prompter_dir), tok, HFEngine(target, tok),
                        reward_funcs=[keyword_reward], train_dataset=["a"])


def test_a_multimodal_targets_room_is_its_text_configs():
    """A multimodal model keeps max_position_embeddings in its text config: the check read the top-level config only,
    found no limit, and let a budget with no room for a prompt through to the first generation."""
    from types import SimpleNamespace

    from transformers import Gemma3Config

    from alignfast.trainer.align_pro import check_target_room

    text = dict(max_position_embeddings=64, vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                num_key_value_heads=1, intermediate_size=16, head_dim=16)
    model = SimpleNamespace(config=Gemma3Config(text_config=text))
    assert check_target_room(model, 10) == 54
    with pytest.raises(AlignfastArgumentError, match=r"'target_max_new_tokens' \(64\) leaves no room for a prompt: "
                                                     r"the model's max_position_embeddings is 64"):
        check_target_room(model, 64)
