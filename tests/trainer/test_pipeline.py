"""The Align-Pro data flow: who sees what. The prompter sees the rewrite instruction in its own chat
template; the target sees target_prompt_template filled with the decoded rewrite, in ITS tokenizer's
chat format; the reward scores the target's answer against the ORIGINAL prompt. Prompter, target and
reward model each have their own tokenizer here (different vocabularies, ids and templates)."""

import math

import torch
from transformers import AutoModelForCausalLM

from alignfast.rollout import templates
from alignfast.rollout.engine import Completion, TargetEngine
from alignfast.rollout.rewards import RewardModel
from alignfast.trainer import AlignProConfig, AlignProTrainer
from tests.trainer.tiny import (
    TRAIN_PROMPTS,
    WORDS,
    FunctionTarget,
    keyword_reward,
    make_causal_lm,
    make_reward_model,
    make_tokenizer,
    small_world,
)


def test_reward_sees_the_original_prompt_and_target_its_own_format(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    target_tok = make_tokenizer(tmp_path / "target_tok", list(reversed(WORDS)))  # other ids for the same words
    seen_requests, seen_rewards = [], []
    target = FunctionTarget(lambda s: (seen_requests.append(s), s.replace("<user>", "").replace("<assistant>", ""))[1],
                            target_tok)

    def reward(prompts, completions, **columns):
        seen_rewards.append((list(prompts), list(completions), columns))
        return keyword_reward(prompts, completions)

    cfg = AlignProConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, max_steps=1,
                         response_length=3, save_strategy="no", rewrite_template="rewrite {prompt}",
                         target_prompt_template="answer {rewrite} about {prompt}")
    data = [{"prompt": p, "topic": i} for i, p in enumerate(TRAIN_PROMPTS[:3])]
    trainer = AlignProTrainer(cfg, AutoModelForCausalLM.from_pretrained(prompter_dir), tok, target,
                              target_tokenizer=target_tok, reward_funcs=[reward], train_dataset=data)
    res = trainer.rollout([d["prompt"] for d in data], columns={"topic": [0, 1, 2]})
    prompts, answers, columns = seen_rewards[-1]
    assert prompts == [d["prompt"] for d in data]  # r(x, y) on the original x
    assert columns["topic"] == [0, 1, 2] and columns["rewrites"] == res.rewrites
    for x, rewrite, request in zip(prompts, res.rewrites, seen_requests[-3:]):
        # The target got its own chat format around the filled target template (decoded from ids).
        expected = target_tok.decode(templates.user_turn_ids(target_tok, f"answer {rewrite} about {x}"),
                                     skip_special_tokens=True)
        assert request == expected.strip()
    # The prompter's own input was the rewrite instruction in its chat template.
    query = trainer._sample(prompts, {}, greedy=True, seed=0).query_ids[0]
    assert tok.decode(query[query != tok.pad_token_id]).startswith("<user> rewrite what is a cat <assistant>")


def test_real_models_with_three_tokenizers(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    target_tok = make_tokenizer(tmp_path / "target", list(reversed(WORDS)))
    make_causal_lm(tmp_path / "target", len(target_tok), seed=5, hidden=16)
    reward_tok = make_tokenizer(tmp_path / "reward", [*WORDS, "extra"], chat_template=False)
    make_reward_model(tmp_path / "reward", len(reward_tok), seed=6, hidden=16)
    cfg = AlignProConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                         response_length=4, target_max_new_tokens=5, save_strategy="no", logging_steps=1,
                         rewrite_template="rewrite {prompt}", target_num_samples=2, target_temperature=1.0)
    trainer = AlignProTrainer(cfg, str(prompter_dir), None, str(tmp_path / "target"),
                              reward_model=str(tmp_path / "reward"), train_dataset=TRAIN_PROMPTS)
    assert trainer.target_tokenizer is not None
    out = trainer.train()
    for key in ("objective/kl", "objective/scores", "loss/policy_avg", "loss/value_avg", "timing_s/target_gen"):
        assert math.isfinite(out.metrics[key]), key
    assert out.metrics["timing_s/target_gen"] > 0
    res = trainer.rollout(TRAIN_PROMPTS[:2], seed=3)
    assert all(len(a) == 2 for a in res.all_answers)
    rm = RewardModel(str(tmp_path / "reward"))
    for x, answers, score in zip(res.prompts, res.all_answers, res.scores):
        assert math.isclose(score, sum(rm([x, x], answers)) / 2, rel_tol=1e-5, abs_tol=1e-6)


class CountingTarget(TargetEngine):
    """Answers sample k of each prompt with the word list 'fish' * k (so samples differ)."""

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1, seed=None):
        return [[Completion(text=" ".join(["fish"] * k), token_ids=[0] * k) for k in range(n)] for _ in prompts]


def test_target_samples_are_averaged_and_missing_eos_is_penalised(tmp_path):
    tok, prompter_dir = small_world(tmp_path)

    def count_fish(prompts, completions, **columns):
        return [float(c.split().count("fish")) for c in completions]

    cfg = AlignProConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1,
                         response_length=2, target_num_samples=3, missing_eos_penalty=2.0, save_strategy="no")
    trainer = AlignProTrainer(cfg, AutoModelForCausalLM.from_pretrained(prompter_dir), tok, CountingTarget(),
                              reward_funcs=[count_fish], train_dataset=TRAIN_PROMPTS)
    assert trainer.rollout(["a dog"]).scores == [1.0]  # mean of 0, 1, 2
    trainer.train()
    r = trainer.last_rollout
    assert torch.equal(r.scores, 1.0 - 2.0 * (~r.ended).float())


def test_tokenizer_without_pad_token(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", WORDS, pad=False)
    assert tok.pad_token_id is None
    make_causal_lm(tmp_path / "prompter", len(tok), seed=0)
    cfg = AlignProConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, max_steps=1,
                         response_length=4, save_strategy="no")
    trainer = AlignProTrainer(cfg, str(tmp_path / "prompter"), tok, FunctionTarget(lambda s: s, tok),
                              reward_funcs=[keyword_reward], train_dataset=TRAIN_PROMPTS)
    assert trainer.pad_id == tok.eos_token_id
    trainer.train()
    r = trainer.last_rollout
    # EOS pads: masks come from positions, so an EOS action is still counted and the pads after it are not.
    for ids, mask, ended in zip(r.response_ids.tolist(), r.response_mask.tolist(), r.ended.tolist()):
        n = sum(mask)
        assert mask == [True] * n + [False] * (len(mask) - n)
        assert ended == (ids[n - 1] == tok.eos_token_id)


def test_empty_rewrite_reaches_a_base_model_target_as_its_start_token(tmp_path):
    """A prompter whose first token is EOS rewrites x as ''. A target without a chat template whose tokenizer
    adds no BOS (a GPT-2-style base model) then got zero tokens and HFEngine stopped the run ('prompts[i] has
    no tokens'); it now gets the BOS (else EOS) token alone and answers."""
    from alignfast.rollout import HFEngine
    from alignfast.rollout.rewards import WeightedRewards
    from alignfast.trainer import AlignProEnvironment

    target_tok = make_tokenizer(tmp_path / "target", WORDS, chat_template=False)
    assert target_tok("", add_special_tokens=True)["input_ids"] == []
    target = make_causal_lm(tmp_path / "target", len(target_tok), seed=5, hidden=16)
    env = AlignProEnvironment(HFEngine(target, target_tok), WeightedRewards([keyword_reward]),
                              target_tokenizer=target_tok, rewrite_template="{prompt}", max_new_tokens=3)
    assert env.target_inputs(["", "a dog"]) == [[target_tok.bos_token_id], target_tok("a dog")["input_ids"]]
    out = env.step(["a dog", "why fish"], ["", "why fish"], {}, seed=0)
    assert len(out.scores) == 2 and all(math.isfinite(s) for s in out.scores)
