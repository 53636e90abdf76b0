"""Training makes progress on a non-trivial task, for both arms.

The task (tests.trainer.tiny.keyword_reward): the answer should contain the LAST word of the original
prompt (+1), the word "please" (+0.5), and be short (-0.05 per word). The target echoes the rewrite,
so the prompter must learn a prompt-dependent rewrite (copy a word from its input), end it early and
add "please": the random-init prompter scores about 0.2.
"""

import torch
from transformers import AutoModelForCausalLM

from alignfast.trainer import AlignProConfig, AlignProTrainer, OracleTrainer
from tests.trainer.tiny import TRAIN_PROMPTS, FunctionTarget, keyword_reward, small_world


def mean(xs):
    return sum(xs) / len(xs)


def test_align_pro_reward_rises(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    cfg = AlignProConfig(output_dir=str(tmp_path / "out"), seed=0, per_device_train_batch_size=16, max_steps=30,
                         response_length=6, temperature=1.0, kl_coef=0.02, learning_rate=1e-2, save_strategy="no",
                         logging_steps=100, rewrite_template="rewrite {prompt}")
    trainer = AlignProTrainer(cfg, AutoModelForCausalLM.from_pretrained(prompter_dir), tok,
                              FunctionTarget(lambda s: s, tok), reward_funcs=[keyword_reward],
                              train_dataset=TRAIN_PROMPTS)
    before = trainer.rollout(TRAIN_PROMPTS * 4, greedy=False, seed=1).mean_score
    history = trainer.train().history
    after = trainer.rollout(TRAIN_PROMPTS * 4, greedy=False, seed=1).mean_score
    scores = [h["objective/scores"] for h in history]
    first, last = mean(scores[:5]), mean(scores[-5:])
    # Seen with these seeds: sampled rollouts 0.41 -> 0.75; training scores rise by about 0.45.
    assert last > first + 0.2, (first, last)
    assert after > before + 0.15, (before, after)


def test_oracle_arm_trains_the_model_itself(tmp_path):
    tok, model_dir = small_world(tmp_path)
    cfg = AlignProConfig(output_dir=str(tmp_path / "out"), seed=0, per_device_train_batch_size=8, max_steps=3,
                         response_length=4, learning_rate=1e-2, save_steps=3, logging_steps=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = OracleTrainer(cfg, model, tok, reward_funcs=[keyword_reward], train_dataset=TRAIN_PROMPTS)
    out = trainer.train()
    assert out.global_step == 3
    assert any(not (p == initial[n]).all() for n, p in trainer.model.named_parameters())
    res = trainer.rollout(TRAIN_PROMPTS[:3])
    assert res.rewrites == TRAIN_PROMPTS[:3]  # no rewrite in the Oracle arm
    assert res.scores == keyword_reward(TRAIN_PROMPTS[:3], res.answers)
    assert (tmp_path / "out" / "checkpoint-3" / "policy" / "config.json").exists()


def test_user_value_model_and_reference_model(tmp_path):
    """A TRL-style value model (a sequence classifier: backbone + score head) and an explicit ref_model."""
    from tests.trainer.tiny import make_reward_model

    tok, model_dir = small_world(tmp_path)
    critic = make_reward_model(tmp_path / "critic", len(tok), seed=4, hidden=16)
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = AlignProConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                         response_length=3, learning_rate=1e-2, save_strategy="no")
    trainer = AlignProTrainer(cfg, AutoModelForCausalLM.from_pretrained(model_dir), tok,
                              FunctionTarget(lambda s: s, tok), reward_funcs=[keyword_reward],
                              train_dataset=TRAIN_PROMPTS, value_model=critic, ref_model=ref)
    score_before = critic.score.weight.detach().clone()
    trainer.train()
    assert trainer.ref_model is ref and not any(p.requires_grad for p in ref.parameters())
    assert not torch.equal(critic.score.weight, score_before)  # the critic's own head trains
    r = trainer.last_rollout
    assert torch.equal(r.ref_logprobs, trainer._ref_logprobs(r.query_ids, r.query_mask, r.response_ids,
                                                             r.response_mask))
