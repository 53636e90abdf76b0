"""The fast backend's full-sequence forwards run their F.linear calls through alignfast.ops.linear
(trainer/policy.fast_gemms_on), whose float32 CPU GEMMs use oneDNN where the process chose it (ops/cpu_gemm.py).

Checked here: the same fast run with ATen's GEMMs and with oneDNN's draws the same rollouts (the sampler is
never routed) and agrees on every loss, metric and weight to float32 rounding; the route is taken by the
policy, the reference policy and the critic, and not at all on the reference backend, under activation
checkpointing, or where the process's library is ATen (F.linear already runs ATen's GEMMs)."""

import pytest
import torch

from alignfast.ops import cpu_gemm
from alignfast.ops.linear import RouteLinear, _Linear
from alignfast.trainer.policy import fast_gemms_on
from tests.trainer.tiny import assert_runs_agree, echo_trainer, small_world
from tests.utils import relative_error

pytestmark = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="oneDNN's matmul is not reachable here")


@pytest.fixture(autouse=True)
def _every_gemm_size():
    """The tiny models' GEMMs are below oneDNN's size rule (cpu_gemm.min_macs_per_thread): route them anyway."""
    with cpu_gemm.smallest_gemm(0):
        yield

STEPS = 2
CFG = dict(backend="fast", seed=3, per_device_train_batch_size=2, gradient_accumulation_steps=2, num_mini_batches=2,
           num_ppo_epochs=2, max_steps=STEPS, response_length=5, temperature=0.9, kl_coef=0.1, learning_rate=3e-3,
           save_strategy="no", logging_steps=1, rewrite_template="rewrite {prompt}", value_head="separate")


def run(tmp_path, name, library, monkeypatch, **overrides):
    calls = {"n": 0}
    original = _Linear.apply

    def counting(*args):
        calls["n"] += 1
        return original(*args)

    monkeypatch.setattr(_Linear, "apply", counting)
    tok, prompter_dir = small_world(tmp_path)
    with cpu_gemm.use(library):
        trainer, rec = echo_trainer(tok, prompter_dir, output_dir=str(tmp_path / name), **{**CFG, **overrides})
        trainer.train()
    return trainer, rec, calls["n"]


def test_onednn_run_matches_the_aten_run(tmp_path, monkeypatch):
    fast, rf, routed = run(tmp_path, "onednn", "onednn", monkeypatch)
    plain, rp, not_routed = run(tmp_path, "aten", "aten", monkeypatch)
    assert routed > 0 and not_routed == 0
    assert_runs_agree(rf, rp, STEPS, ("loss/value_avg", "objective/kl", "policy/approxkl_avg", "loss/policy_avg"),
                      metric_tol=1e-4)
    for (name, a), (_, b) in zip(fast.model.named_parameters(), plain.model.named_parameters()):
        assert relative_error(a, b) <= 1e-5, name
    for (name, a), (_, b) in zip(fast.value_model.named_parameters(), plain.value_model.named_parameters()):
        assert relative_error(a, b) <= 1e-5, name


def test_policy_reference_and_critic_each_take_the_route(tmp_path, monkeypatch):
    """Counted per model: the routed F.linear calls made inside each one's forwards."""
    original = _Linear.apply
    tok, prompter_dir = small_world(tmp_path)
    with cpu_gemm.use("onednn"):
        trainer, _ = echo_trainer(tok, prompter_dir, output_dir=str(tmp_path / "x"), **{**CFG, "max_steps": 1})
        counts, current = {}, []
        monkeypatch.setattr(_Linear, "apply", lambda *a: counts.__setitem__(current[-1], counts.get(current[-1], 0)
                                                                             + 1) or original(*a))
        for name, owner in (("policy", trainer.policy), ("reference", trainer._ref_policy),
                            ("critic", trainer.value_model)):
            forward = owner.forward

            def tagged(*args, _forward=forward, _name=name, **kwargs):
                current.append(_name)
                try:
                    return _forward(*args, **kwargs)
                finally:
                    current.pop()

            owner.forward = tagged
        trainer.train()
    assert set(counts) == {"policy", "reference", "critic"} and min(counts.values()) > 0, counts


def test_no_route_on_the_reference_backend(tmp_path, monkeypatch):
    _, _, routed = run(tmp_path, "x", "onednn", monkeypatch, max_steps=1, backend="reference")
    assert routed == 0


def test_checkpointed_models_are_not_routed(tmp_path, monkeypatch):
    """The backward's recompute of a checkpointed layer runs outside the forward's block: the policy and the
    critic keep ATen's GEMMs, and the reference policy with them."""
    trainer, _, routed = run(tmp_path, "x", "onednn", monkeypatch, max_steps=1, gradient_checkpointing=True)
    with cpu_gemm.use("onednn"):
        assert not isinstance(fast_gemms_on(trainer.policy), RouteLinear)
        assert not isinstance(fast_gemms_on(trainer.value_model), RouteLinear)
        # The reference policy follows the policy, so that at step 1 their log-probs (and the KL) agree exactly.
        assert not isinstance(fast_gemms_on(trainer._ref_policy), RouteLinear)
    assert routed == 0
