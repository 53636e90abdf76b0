"""PPO engine pieces: the policy's two log-prob paths agree (values and gradients), whitened rewards
match TRL's formula, padding margins are trimmed safely, update counts follow the config, and the
adaptive KL controller follows Ziegler et al."""

import copy

import pytest
import torch

from alignfast import reference
from alignfast.trainer.config import AlignProConfig
from alignfast.trainer.kl_controller import AdaptiveKLController, FixedKLController, make_kl_controller
from alignfast.trainer.policy import CausalLMPolicy, ValueModel, value_head_for
from alignfast.trainer.ppo_core import PPOUpdater, Rollout, compute_advantages, make_opset, trim_columns
from alignfast.trainer.sampling import left_pad
from tests.trainer.tiny import make_causal_lm
from tests.utils import assert_close, random_mask, relative_error

V = 23


def batch(generator):
    q_ids, q_mask = left_pad([[1, 5, 6, 7], [1, 8], [1, 9, 10], [4, 4, 4, 4, 4]], 0)
    r_ids = torch.randint(3, V, (4, 6), generator=generator)
    r_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]]).bool()
    return q_ids, q_mask, r_ids, r_mask


def test_fast_and_reference_policy_paths_agree(tmp_path):
    g = torch.Generator().manual_seed(0)
    model = make_causal_lm(tmp_path / "m", V, seed=2, hidden=16, layers=2, initializer_range=0.3)
    head = value_head_for(model)
    torch.nn.init.normal_(head.weight, std=0.5, generator=g)
    q_ids, q_mask, r_ids, r_mask = batch(g)
    outs = {}
    for backend in ("fast", "reference"):
        model.zero_grad()
        head.zero_grad()
        policy = CausalLMPolicy(model, backend=backend, value_head=head)
        out = policy.forward(q_ids, q_mask, r_ids, r_mask, temperature=0.7, return_entropy=True, entropy_grad=True)
        loss = (out.logprobs * 1.3 + out.entropy * 0.2 + out.values).sum()
        loss.backward()
        outs[backend] = (out, [p.grad.clone() for p in [*model.parameters(), *head.parameters()]])
    (fo, fg), (ro, rg) = outs["fast"], outs["reference"]
    assert CausalLMPolicy(model, backend="fast").fused
    # float32 models: the paths differ in summation order only.
    assert_close(fo.logprobs, ro.logprobs, rtol=1e-5, atol=1e-5, name="logprobs")
    assert_close(fo.entropy, ro.entropy, rtol=1e-5, atol=1e-5, name="entropy")
    assert_close(fo.values, ro.values, rtol=1e-5, atol=1e-5, name="values")
    assert (fo.logprobs[~r_mask] == 0).all() and (fo.logprobs[r_mask] < 0).all()
    # Gradients: both float32 paths against the same model in float64. Their difference (a few 1e-6 on
    # gradients of ~1e-2) is float32 rounding in different summation orders, so the bar is that the fast
    # path is as accurate as the reference, norm-wise per parameter, and close elementwise.
    model64, head64 = copy.deepcopy(model).double(), copy.deepcopy(head).double()
    model64.zero_grad()
    head64.zero_grad()
    out64 = CausalLMPolicy(model64, backend="reference", value_head=head64).forward(
        q_ids, q_mask, r_ids, r_mask, temperature=0.7, return_entropy=True, entropy_grad=True)
    (out64.logprobs * 1.3 + out64.entropy * 0.2 + out64.values).sum().backward()
    truth = [p.grad for p in [*model64.parameters(), *head64.parameters()]]
    for a, b, t in zip(fg, rg, truth):
        assert_close(a, b, rtol=1e-4, atol=2e-5, name="grad")
        fast_err, ref_err = relative_error(a, t), relative_error(b, t)
        assert fast_err <= 2 * ref_err + 1e-6, f"fast path grad error {fast_err:.3g} vs reference {ref_err:.3g}"
    # Without an entropy bonus the entropy is a detached statistic on both paths (TRL's no_grad).
    for backend in ("fast", "reference"):
        out = CausalLMPolicy(model, backend=backend).forward(q_ids, q_mask, r_ids, r_mask, temperature=0.7,
                                                             return_entropy=True)
        assert out.logprobs.requires_grad and not out.entropy.requires_grad
        assert_close(out.entropy, ro.entropy, rtol=1e-5, atol=1e-5, name=f"{backend} entropy")


def test_value_model_matches_its_backbone(tmp_path):
    g = torch.Generator().manual_seed(1)
    model = make_causal_lm(tmp_path / "m", V, seed=3, hidden=16)
    critic = ValueModel.from_causal_lm(model)
    assert (critic(*batch(g)) == 0).all()  # zero-initialised head
    torch.nn.init.normal_(critic.head.weight, generator=g)
    q_ids, q_mask, r_ids, r_mask = batch(g)
    v = critic(q_ids, q_mask, r_ids, r_mask)
    shared = CausalLMPolicy(model, backend="reference", value_head=critic.head)
    assert_close(v, shared.forward(q_ids, q_mask, r_ids, r_mask, temperature=1.0).values, rtol=1e-5, atol=1e-6)
    assert critic.backbone is not model.model  # a copy: training the critic leaves the policy alone


def test_whitened_rewards_follow_trl():
    g = torch.Generator().manual_seed(4)
    B, T = 6, 9
    mask = random_mask(B, T, generator=g)
    mask[3] = True  # keep at least a few rows fully valid
    lp, ref_lp, values = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    roll = Rollout(query_ids=None, query_mask=None, response_ids=None, response_mask=mask, ended=None, logprobs=lp,
                   ref_logprobs=ref_lp, values=values, scores=scores)
    got = compute_advantages(roll, make_opset("reference"), kl_coef=0.3, kl_estimator="k1", gamma=0.99, lam=0.9,
                             whiten_rewards=True, whiten_advantages=False)
    # TRL: rewards = -kl_coef * kl (+ score at the last valid token); whiten keeping the mean; then GAE.
    rewards = torch.where(mask, -0.3 * (lp - ref_lp), torch.zeros_like(lp))
    for b in range(B):
        valid = mask[b].nonzero()
        if len(valid):
            rewards[b, valid[-1]] += scores[b]
    mean = rewards[mask].mean()
    rewards = torch.where(mask, (rewards - mean) / torch.sqrt(rewards[mask].var() + 1e-8) + mean, 0 * rewards)
    adv = torch.zeros_like(rewards)
    for b in range(B):
        nxt_v, nxt_a = 0.0, 0.0
        for t in reversed(mask[b].nonzero().flatten().tolist()):
            delta = rewards[b, t] + 0.99 * nxt_v - values[b, t]
            nxt_a = delta + 0.99 * 0.9 * nxt_a
            adv[b, t], nxt_v = nxt_a, values[b, t]
    assert_close(got.rewards, rewards, rtol=1e-12, atol=1e-12, name="rewards")
    assert_close(got.advantages, adv, rtol=1e-10, atol=1e-12, name="advantages")
    assert_close(got.returns, torch.where(mask, adv + values, 0 * adv), rtol=1e-10, atol=1e-12, name="returns")
    assert_close(got.kl, torch.where(mask, lp - ref_lp, 0 * lp), rtol=0, atol=0, name="kl")


def test_trim_columns():
    q = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]]).bool()
    r = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    assert trim_columns(q, r) == (2, 2)
    assert trim_columns(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)) == (2, 1)


def test_update_makes_epochs_times_mini_batches_optimizer_steps(tmp_path):
    model = make_causal_lm(tmp_path / "m", V, seed=5, hidden=16)
    cfg = AlignProConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_mini_batches=2,
                         num_ppo_epochs=3)
    head = value_head_for(model)
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3)
    steps = []
    opt.register_step_post_hook(lambda *a: steps.append(1))
    g = torch.Generator().manual_seed(6)
    q_ids, q_mask, r_ids, r_mask = batch(g)
    q_ids, q_mask, r_ids, r_mask = (torch.cat([x, x]) for x in (q_ids, q_mask, r_ids, r_mask))
    policy = CausalLMPolicy(model, backend="fast", value_head=head)
    with torch.no_grad():
        out = policy.forward(q_ids, q_mask, r_ids, r_mask, temperature=cfg.temperature)
    roll = Rollout(q_ids, q_mask, r_ids, r_mask, torch.ones(8, dtype=torch.bool), out.logprobs, out.logprobs,
                   out.values, torch.randn(8, generator=g))
    adv = compute_advantages(roll, make_opset("fast"), kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=0.95,
                             whiten_rewards=False, whiten_advantages=True)
    stats = PPOUpdater(policy, None, opt, params, make_opset("fast"), cfg).update(roll, adv, torch.Generator())
    assert len(steps) == 3 * 2
    assert len(stats.losses) == 3 * 2 * 2
    assert abs(stats.series("ratio")[0] - 1.0) < 1e-6  # first micro-batch: the policy has not moved yet


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 256)  # error clipped to +0.2
    assert abs(ctl.value - 0.2 * (1 + 0.2 * 256 / 10000)) < 1e-15
    ctl.update(6.0 * 0.9, 100)  # error -0.1
    assert abs(ctl.value - 0.2 * (1 + 0.2 * 256 / 10000) * (1 - 0.1 * 100 / 10000)) < 1e-15
    again = make_kl_controller(AlignProConfig(adap_kl_ctrl=True, kl_coef=0.5))
    again.load_state_dict(ctl.state_dict())
    assert again.value == ctl.value
    assert reference.kl_estimate(torch.tensor(1.0), torch.tensor(0.0), "k3") > 0


def test_soft_capped_logits_are_not_fused(tmp_path):
    """A model whose logits are not head(hidden) (final soft-capping) takes model(...).logits on the fast path."""
    g = torch.Generator().manual_seed(7)
    model = make_causal_lm(tmp_path / "m", V, seed=8, hidden=16, initializer_range=0.5)
    q_ids, q_mask, r_ids, r_mask = batch(g)
    plain = CausalLMPolicy(model, backend="fast").forward(q_ids, q_mask, r_ids, r_mask, temperature=1.0).logprobs
    model.config.final_logit_softcapping = 30.0  # flagged; Llama itself ignores it, which the test exploits
    policy = CausalLMPolicy(model, backend="fast", value_head=value_head_for(model))
    assert not policy.fused
    out = policy.forward(q_ids, q_mask, r_ids, r_mask, temperature=1.0)
    assert_close(out.logprobs, plain, rtol=1e-5, atol=1e-6, name="logprobs")
    assert out.values is not None and out.values.shape == r_ids.shape


def test_norm_weights_and_biases_get_no_weight_decay(tmp_path):
    """TRL (transformers' Trainer) exempts biases and norm weights from weight decay; the PPO core decayed every
    trained parameter, so AdamW pulled the RMSNorm gains towards 0 at every optimizer step."""
    from alignfast.trainer.optimizers import make_optimizer, no_weight_decay

    model = make_causal_lm(tmp_path / "m", V, seed=5, hidden=16)
    head = value_head_for(model)
    params = [*model.parameters(), *head.parameters()]
    exempt = no_weight_decay([model, head])
    names = {id(p): n for n, p in [*model.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]}
    assert sorted(names[i] for i in exempt) == ["head.bias", "model.layers.0.input_layernorm.weight",
                                                 "model.layers.0.post_attention_layernorm.weight", "model.norm.weight"]
    decayed = make_optimizer(params, AlignProConfig(weight_decay=0.1), no_decay=exempt)
    wd = {id(p): g["weight_decay"] for g in decayed.param_groups for p in g["params"]}
    assert all(wd[id(p)] == (0.0 if id(p) in exempt else 0.1) for p in params)
    assert [p for g in decayed.param_groups for p in g["params"]] == params  # the order (and state indices) kept
    # without weight decay the groups are what they always were, so earlier runs' checkpoints still resume
    plain = make_optimizer(params, AlignProConfig(weight_decay=0.0), no_decay=exempt)
    assert len(plain.param_groups) == 1


@pytest.mark.parametrize("estimator", ["k2", "abs"])
def test_the_measured_kl_is_a_kl_estimate_whatever_the_penalty(tmp_path, estimator):
    """k2 and abs are penalties, not KL estimates: their sum was logged as objective/kl and fed to the adaptive
    controller, which then moved the coefficient the wrong way (a review measured 2.27 and 4.81 for a true 1.74)."""
    from tests.trainer.tiny import echo_trainer, make_tokenizer, WORDS

    tok = make_tokenizer(tmp_path / "tok", WORDS)
    make_causal_lm(tmp_path / "p", len(tok), seed=5, hidden=16)
    trainer, _ = echo_trainer(tok, tmp_path / "p", output_dir=str(tmp_path / "run"), seed=5, max_steps=1,
                              per_device_train_batch_size=4, num_mini_batches=1, response_length=5, temperature=0.9,
                              save_strategy="no", rewrite_template="rewrite {prompt}", kl_estimator=estimator,
                              report_to="none")
    trainer.train()
    r = trainer.last_rollout
    k1 = ((r.logprobs - r.ref_logprobs) * r.response_mask).sum(1).mean()
    assert trainer.history[-1]["objective/kl"] == pytest.approx(float(k1), rel=1e-6, abs=1e-9)


def test_a_resumed_state_gets_this_runs_weight_decay_and_keeps_its_parameters_in_order(tmp_path):
    """torch's load_state_dict restores the saved groups' hyperparameters: a resume with another weight_decay (one
    group either way, as under LoRA) logged the change and silently kept the old value. And the torchao optimizers
    grouped [decayed..., exempt...], so regrouping a saved state by position put AdamW moments on other
    parameters; their groups now keep the parameters' order, and a state whose moments do not have this run's
    shapes in that order is left to torch to refuse."""
    from alignfast.trainer.optimizers import make_optimizer, no_weight_decay, own_hyperparameters, regrouped_state

    model = make_causal_lm(tmp_path / "m", V, seed=5, hidden=16)
    params = list(model.parameters())
    exempt = no_weight_decay([model])
    saved_opt = make_optimizer(params, AlignProConfig(weight_decay=0.0))
    for p in params:
        p.grad = torch.ones_like(p)
    saved_opt.step()
    saved = saved_opt.state_dict()
    scheduler = {"base_lrs": [1e-3], "last_epoch": 3}

    same_groups = make_optimizer(params, AlignProConfig(weight_decay=0.0, adam_epsilon=1e-6))
    state, _ = regrouped_state(saved, scheduler, same_groups)
    with own_hyperparameters(same_groups):  # as the trainers load it
        same_groups.load_state_dict(state)
    assert same_groups.param_groups[0]["eps"] == 1e-6  # this run's, not the checkpoint's 1e-8

    regrouped = make_optimizer(params, AlignProConfig(weight_decay=0.1), no_decay=exempt)
    state, sched = regrouped_state(saved, scheduler, regrouped)
    with own_hyperparameters(regrouped):
        regrouped.load_state_dict(state)
    assert [g["weight_decay"] for g in regrouped.param_groups] == \
        [0.0 if id(g["params"][0]) in exempt else 0.1 for g in regrouped.param_groups]
    assert sched["base_lrs"] == [1e-3] * len(regrouped.param_groups)
    for p in params:
        assert torch.equal(regrouped.state[p]["exp_avg"], saved_opt.state[p]["exp_avg"])

    shuffled = {**saved, "state": {i: saved["state"][(i + 1) % len(params)] for i in range(len(params))}}
    assert regrouped_state(shuffled, scheduler, regrouped)[0] is shuffled  # not this run's shapes: torch refuses
    torchao = pytest.importorskip("torchao")  # noqa: F841
    low_bit = make_optimizer(params, AlignProConfig(weight_decay=0.1, optim="adamw_torch_8bit"), no_decay=exempt)
    assert [p for g in low_bit.param_groups for p in g["params"]] == params


def test_a_sharded_load_keeps_this_runs_hyperparameters(tmp_path):
    """accelerate's load_state of a sharded checkpoint restores the saved groups' hyperparameters wholesale, as
    torch's load_state_dict does: the run's own weight_decay, betas and eps are put back after it."""
    from alignfast.trainer.optimizers import make_optimizer, own_hyperparameters

    model = make_causal_lm(tmp_path / "m", V, seed=5, hidden=16)
    params = list(model.parameters())
    saved = make_optimizer(params, AlignProConfig(weight_decay=0.1, adam_beta1=0.9, adam_epsilon=1e-8)).state_dict()
    mine = make_optimizer(params, AlignProConfig(weight_decay=0.05, adam_beta1=0.8, adam_epsilon=1e-6))
    with own_hyperparameters(mine):
        mine.load_state_dict(saved)  # stands for accelerator.load_state
    assert all((g["weight_decay"], g["betas"][0], g["eps"]) == (0.05, 0.8, 1e-6) for g in mine.param_groups)
