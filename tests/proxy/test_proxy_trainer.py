"""ProxyRLHFTrainer on the toy world: the PPO core's contract for a policy whose actions are decisions.

  * the decision log-probs and values the PPO step uses equal a recomputation by the proxy, and the
    decoder's own record of them;
  * the fast path (fused ops) and backend="reference" (the spec, proposals included) train to the same
    proxy (float32, 1e-5);
  * a run stopped at a checkpoint and resumed ends bitwise where the uninterrupted run ends;
  * the proxy is at most 1% of the target; config errors name the field.
"""

from __future__ import annotations

import pytest
import torch

from alignfast.trainer.proxy_rlhf import ProxyRLHFConfig, ProxyRLHFTrainer


@pytest.fixture(scope="module")
def world():
    from alignfast.toy import load_world

    return load_world()


def make_trainer(world, tmp_path, name="run", **over):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = dict(output_dir=str(tmp_path / name), seed=3, save_strategy="no", logging_steps=1, learning_rate=1e-2,
               num_ppo_epochs=2, num_mini_batches=2, per_device_train_batch_size=8, max_steps=3,
               target_max_new_tokens=6, target_temperature=1.0, proxy_hidden_size=16, max_rejections_per_token=2,
               accept_prior=0.8, rejection_cost=0.05, report_to="none")
    proxy = over.pop("proxy", None)
    cfg.update(over)
    tok = AutoTokenizer.from_pretrained(world.target_path)
    target = AutoModelForCausalLM.from_pretrained(world.target_path)
    torch.manual_seed(0)
    return ProxyRLHFTrainer(ProxyRLHFConfig(**cfg), target, tok, proxy=proxy, reward_funcs=world.reward_funcs,
                            train_dataset=world.train_prompts[:64])


def proxy_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_decision_logprobs_match_recomputation(world, tmp_path):
    tr = make_trainer(world, tmp_path, max_steps=1)
    tr.train()
    res, roll = tr.last_decode, tr.last_rollout
    m = roll.response_mask
    assert int(m.sum()) > 0 and int((roll.response_ids[m] == 0).sum()) > 0  # some rejections happened
    # what the decoder drew with the proxy before the update == the rollout's old log-probs and values
    assert torch.allclose(roll.logprobs[m], res.logprobs[m], atol=1e-6)
    assert torch.allclose(roll.values[m], res.values[m], atol=1e-6)
    # the reference is the Bernoulli(accept_prior) prior
    acc = roll.response_ids == 1
    want = torch.where(acc, torch.tensor(0.8).log(), torch.tensor(0.2).log())
    assert torch.allclose(roll.ref_logprobs[m], want[m])
    assert bool((roll.ref_logprobs[~m] == 0).all())


def test_recomputed_logprobs_are_bernoulli_of_the_proxy(world, tmp_path):
    tr = make_trainer(world, tmp_path, max_steps=1)
    res, _ = tr.proxy_decode([r["prompt"] for r in world.train_prompts[:8]], greedy=False, seed=5)
    roll = tr.build_rollout(res, torch.zeros(8))
    logit, value = tr.model(res.features.double().float())
    lp = torch.where(res.actions == 1, torch.sigmoid(logit).log(), (1 - torch.sigmoid(logit)).log())
    m = res.mask
    assert torch.allclose(roll.logprobs[m], lp[m], atol=1e-5)
    assert torch.allclose(roll.logprobs[m], res.logprobs[m], atol=1e-6)
    assert torch.allclose(roll.values[m], value[m], atol=1e-6)


def test_fast_matches_reference(world, tmp_path):
    fast = make_trainer(world, tmp_path, "fast", backend="fast")
    fast.train()
    ref = make_trainer(world, tmp_path, "ref", backend="reference")
    ref.train()
    for k, v in proxy_state(fast).items():
        assert torch.allclose(v, proxy_state(ref)[k], rtol=1e-5, atol=1e-5), k
    for a, b in zip(fast.history, ref.history):
        assert a["objective/scores"] == b["objective/scores"]
        assert abs(a["loss/policy_avg"] - b["loss/policy_avg"]) < 1e-5


def test_exact_resume(world, tmp_path):
    full = make_trainer(world, tmp_path, "full", max_steps=4)
    full.train()
    part = make_trainer(world, tmp_path, "part", max_steps=4, save_strategy="steps", save_steps=2)
    part.num_steps = 2  # stop after the checkpoint at step 2, as an interrupted run would
    part.train()
    resumed = make_trainer(world, tmp_path, "part", max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.global_step == 4
    for k, v in proxy_state(full).items():
        assert torch.equal(v, proxy_state(resumed)[k]), k
    assert [h["objective/scores"] for h in full.history] == [h["objective/scores"] for h in resumed.history]


def test_proxy_size_and_save(world, tmp_path):
    tr = make_trainer(world, tmp_path)
    assert tr.proxy_fraction <= 0.01
    path = tr.save_model(tmp_path / "saved")
    from alignfast.trainer.proxy_model import ProxyModel

    loaded = ProxyModel.from_pretrained(path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, tr.model.state_dict()[k])


@pytest.mark.parametrize("field,value", [("max_rejections_per_token", 0), ("accept_prior", 1.0),
                                         ("rejection_cost", -1.0), ("target_top_k", -2), ("proxy_hidden_size", 0)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ProxyRLHFConfig(**{field: value})


def test_a_mini_batch_without_decisions_is_skipped_not_divided_by_zero(world, tmp_path):
    """target_top_k=1 leaves one allowed token at every position: every token is forced, the proxy decides
    nothing, and the update divided by the mini-batch's zero decision count (ZeroDivisionError). Now such a
    mini-batch takes no optimizer step: AdamW would still move the weights by its decay."""
    tr = make_trainer(world, tmp_path, target_top_k=1, max_steps=2, weight_decay=0.1)
    before = proxy_state(tr)
    tr.train()
    assert tr.global_step == 2
    for k, v in proxy_state(tr).items():
        assert torch.equal(v, before[k]), k


def test_the_prompt_room_is_checked_and_truncation_is_said(world, tmp_path, caplog):
    """The toy target has 64 positions. target_max_new_tokens 64 left a negative prompt limit (which cut the
    prompt's start as a positive slice), a max_prompt_length beyond the room ran past the positions, and
    truncation said nothing."""
    with pytest.raises(ValueError, match="'target_max_new_tokens' .* leaves no room for a prompt"):
        make_trainer(world, tmp_path, "a", target_max_new_tokens=64)
    with pytest.raises(ValueError, match="'max_prompt_length' .* exceeds the target's max_position_embeddings"):
        make_trainer(world, tmp_path, "b", max_prompt_length=60)
    tr = make_trainer(world, tmp_path, "c", target_max_new_tokens=60)
    prompt = world.train_prompts[0]["prompt"]
    import logging

    with caplog.at_level(logging.WARNING, logger="alignfast"):
        ids = tr._prompt_ids([prompt])
        tr._prompt_ids([prompt])  # said once, not per batch
    said = [r.getMessage() for r in caplog.records if "target's inputs are longer than" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 of 1 target's inputs are longer than 4 tokens"), said
    from alignfast.rollout.templates import user_turn_ids

    assert ids == [user_turn_ids(tr.tokenizer, prompt)[-4:]]


def test_settings_that_would_be_silently_ignored(world, tmp_path):
    with pytest.raises(ValueError, match="'eval_steps' is 1 but there is no eval_dataset"):
        make_trainer(world, tmp_path, "a", eval_steps=1)
    with pytest.warns(UserWarning, match="top_p=0.5 is not used by Proxy-RLHF .*target_top_p"):
        make_trainer(world, tmp_path, "b", top_p=0.5)


def test_an_accepting_proxy_is_paired_with_no_fine_tuning(world, tmp_path):
    """`alignfast eval` compares the proxy arm with No fine-tuning prompt by prompt. Under a sampling target the
    proxy's rollout drew other samples (its chunks and seeds were the policy's, not the target's), so a proxy
    that accepts everything showed wins and losses of sampling noise (8 / 25 / 7 of 40 in a review's run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignfast.eval import arms
    from alignfast.rollout import HFEngine
    from alignfast.rollout.rewards import WeightedRewards
    from alignfast.trainer import AlignProConfig
    from alignfast.trainer.environments import AlignProEnvironment
    from alignfast.trainer.proxy_model import ProxyModel

    tok = AutoTokenizer.from_pretrained(world.target_path)
    target = AutoModelForCausalLM.from_pretrained(world.target_path)
    accept_all = ProxyModel(target.config.hidden_size, target.get_input_embeddings().embedding_dim, 16,
                            accept_bias=30.0)
    settings = dict(target_temperature=1.0, target_max_new_tokens=6, target_batch_size=4)
    tr = make_trainer(world, tmp_path, proxy=accept_all, per_device_eval_batch_size=3, **settings)
    prompts = [r["prompt"] for r in world.eval_prompts[:10]]
    env = AlignProEnvironment.from_config(AlignProConfig(output_dir=str(tmp_path / "x"), report_to="none", **settings),
                                          HFEngine(target, tok), WeightedRewards(world.reward_funcs),
                                          target_tokenizer=tok)
    baseline = arms.no_fine_tuning(env, prompts, seed=11)
    assert tr.rollout(prompts, greedy=True, seed=11).answers == baseline.answers


@pytest.mark.parametrize("nucleus", [dict(target_top_p=0.9), dict(target_top_k=3),
                                     dict(target_top_p=0.7, target_top_k=5)])
def test_target_rollout_pairs_an_accepting_proxy_at_any_nucleus(world, tmp_path, nucleus):
    """target_rollout() is the No fine-tuning arm of a proxy's evaluation: the same decoder, settings and draws with
    every proposal accepted. An always-accepting proxy gives its answers, with greedy and with sampled decisions, and
    a rejecting one changes some (the pairing is by the proxy's decisions, not by a second sampler)."""
    from transformers import AutoModelForCausalLM

    from alignfast.trainer.proxy_model import ProxyModel

    target = AutoModelForCausalLM.from_pretrained(world.target_path)
    size = (target.config.hidden_size, target.get_input_embeddings().embedding_dim, 16)
    prompts = [r["prompt"] for r in world.eval_prompts[:12]]
    common = dict(target_temperature=1.0, target_max_new_tokens=6, target_batch_size=5, **nucleus)
    tr = make_trainer(world, tmp_path, "a", proxy=ProxyModel(*size, accept_bias=50.0), **common)
    base = tr.target_rollout(prompts, seed=4)
    assert tr.rollout(prompts, greedy=True, seed=4).answers == base.answers
    assert tr.rollout(prompts, greedy=False, seed=4).answers == base.answers
    assert tr.rollout(prompts, greedy=True, seed=4).scores == base.scores
    rejecting = make_trainer(world, tmp_path, "r", proxy=ProxyModel(*size, accept_bias=-50.0), **common)
    assert rejecting.target_rollout(prompts, seed=4).answers == base.answers
    assert rejecting.rollout(prompts, greedy=True, seed=4).answers != base.answers


def test_a_run_without_any_decision_says_so_once(world, tmp_path, caplog):
    """target_top_p 0.01 leaves one token in every proposal set: every token is forced and the proxy never decides.
    Such a run trained as a silent no-op: proxy/accept_rate 0.0 (it rejected nothing), and torch's "lr_scheduler.step()
    before optimizer.step()" warning, the schedule stepping without an update. Now one warning line names the
    settings, accept_rate is NaN, and the schedule waits for an update."""
    import logging
    import math
    import warnings

    tr = make_trainer(world, tmp_path, target_top_p=0.01, target_temperature=1.0, max_steps=3)
    lr0 = tr.optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="alignfast"):
        warnings.simplefilter("always")
        tr.train()
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
    said = [r.getMessage() for r in caplog.records if "no decision" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0], said
    assert all(k in said[0] for k in ("target_top_p=0.01", "target_top_k=0", "target_temperature=1.0")), said
    assert tr.global_step == 3 and len(tr.history) == 3
    for row in tr.history:
        assert row["proxy/decisions_per_episode"] == 0.0 and row["proxy/forced_per_token"] == 1.0
        assert math.isnan(row["proxy/accept_rate"])
        # nothing was updated: no loss to report (a 0.0 would read as a loss of zero)
        assert all(math.isnan(row[k]) for k in ("loss/policy_avg", "loss/value_avg", "policy/approxkl_avg"))
    assert tr.lr_scheduler.last_epoch == 0 and tr.optimizer.param_groups[0]["lr"] == lr0


def test_accept_rate_is_a_rate_of_decisions(world, tmp_path):
    tr = make_trainer(world, tmp_path, max_steps=1)
    tr.train()
    rate = tr.history[-1]["proxy/accept_rate"]
    assert 0.0 < rate < 1.0 and tr.lr_scheduler.last_epoch == 1
