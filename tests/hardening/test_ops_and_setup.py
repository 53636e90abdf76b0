"""Ops and trainer set-up edge cases (issue 10 cases 2, 4, 13, 16, 17): second derivatives through the fused
log-prob ops are exact (checked with gradgradcheck in float64), ppo_loss says it has none, a hidden size of 0,
a stop_token_id or pad id outside the vocabulary and an unknown device are errors naming the argument, and a
generation step no longer logs transformers' `past_key_values` deprecation."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from alignfast.ops import AlignfastArgumentError, linear_token_logprobs, ppo_loss, ppo_policy_loss_from_logits
from alignfast.ops import force_backend, token_logprobs
from alignfast.trainer import AlignProConfig


def test_second_derivatives_of_token_logprobs_are_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 4, (1, 3), generator=g)
    m = torch.tensor([[True, False, True]])
    assert torch.autograd.gradgradcheck(
        lambda x: token_logprobs(x, t, mask=m, temperature=0.7, return_entropy=True), (x,))
    # and not zero: the Hessian-vector product of sum(logprob) along x itself
    (gx,) = torch.autograd.grad(token_logprobs(x, t).sum(), x, create_graph=True)
    (hv,) = torch.autograd.grad((gx * x).sum(), x)
    assert hv.abs().max() > 1e-3
    # the PPO policy loss on top of it inherits them (a Hessian-vector product against the reference's)
    adv, old = torch.randn(1, 3, dtype=torch.float64, generator=g), torch.randn(1, 3, dtype=torch.float64, generator=g)
    hvp = []
    for backend in ("auto", "reference"):
        with force_backend(backend):
            (gx,) = torch.autograd.grad(ppo_policy_loss_from_logits(x, t, old, adv, m, entropy_coef=0.1)[0], x,
                                        create_graph=True)
            hvp.append(torch.autograd.grad((gx * x).sum(), x)[0])
    torch.testing.assert_close(hvp[0], hvp[1], rtol=1e-9, atol=1e-12)


def test_second_derivatives_of_linear_token_logprobs_are_exact():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 4, (3,), generator=g)
    m = torch.tensor([True, False, True])
    hvp = []
    for backend in ("auto", "reference"):  # Hessian-vector products (along the inputs) against the reference's
        with force_backend(backend):
            lp, ent = linear_token_logprobs(h, w, t, bias=b, mask=m, return_entropy=True, chunk_size=2)
            grads = torch.autograd.grad((lp * 0.7 + ent).sum(), (h, w, b), create_graph=True)
            hvp.append(torch.autograd.grad(sum((gi * xi).sum() for gi, xi in zip(grads, (h, w, b))), (h, w, b)))
    for fast, ref in zip(*hvp):
        assert ref.abs().max() > 1e-3
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-12)


def test_ppo_loss_refuses_second_derivatives_instead_of_returning_zeros():
    g = torch.Generator().manual_seed(2)
    lp = torch.randn(2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    z = torch.randn(2, 3, dtype=torch.float64, generator=g)
    loss, _ = ppo_loss(lp, z, z, lp.detach().clone().requires_grad_(), z, z, torch.ones(2, 3, dtype=torch.bool))
    torch.autograd.grad(loss, lp, retain_graph=True)  # first order: fine
    with pytest.raises(RuntimeError, match=r"ppo_loss has first derivatives only .* alignfast.reference.ppo_loss"):
        torch.autograd.grad(loss, lp, create_graph=True)


def test_hidden_size_zero_is_named():
    with pytest.raises(AlignfastArgumentError, match=r"'hidden' needs a hidden size \(last dimension\) of at least 1"):
        linear_token_logprobs(torch.zeros(3, 0), torch.zeros(5, 0), torch.zeros(3, dtype=torch.long))


def _tiny_trainer(tmp_path, **cfg):
    from transformers import AutoModelForCausalLM

    from alignfast.trainer import AlignProTrainer
    from tests.trainer.tiny import TRAIN_PROMPTS, FunctionTarget, keyword_reward, small_world

    tok, prompter = small_world(tmp_path)
    config = AlignProConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, response_length=3,
                            rewrite_template="{prompt}", max_steps=1, **cfg)
    return AlignProTrainer(config, AutoModelForCausalLM.from_pretrained(prompter), tok,
                           FunctionTarget(lambda s: s, tok), reward_funcs=[keyword_reward],
                           train_dataset=TRAIN_PROMPTS), tok


def test_ids_outside_the_vocabulary_are_named(tmp_path):
    with pytest.raises(AlignfastArgumentError, match=r"'stop_token_id' \(21\) is outside the policy's vocabulary "
                                                     r"\[0, 21\)"):
        _tiny_trainer(tmp_path, stop_token_id=21)
    trainer, tok = _tiny_trainer(tmp_path / "ok", stop_token_id=20)  # the last id is fine
    assert 20 in trainer.stop_ids
    tok.add_special_tokens({"pad_token": "<newpad>"})  # added without resize_token_embeddings
    from alignfast.trainer.base import _special_ids

    with pytest.raises(AlignfastArgumentError, match=r"pad token id 21 is outside the model's vocabulary \[0, 21\): "
                                                     r"resize the embeddings"):
        _special_ids(tok, trainer.model, None)


def test_unknown_or_absent_devices_are_named(tmp_path):
    for bad in ("tpu:9", "gpu", "cuda:x"):
        with pytest.raises(AlignfastArgumentError, match=rf"'device' is not a device torch knows, got '{bad}'"):
            AlignProConfig(device=bad)
    if not torch.cuda.is_available():
        with pytest.raises(AlignfastArgumentError, match=r"'device' is 'cuda:3' but this machine has no CUDA device"):
            _tiny_trainer(tmp_path, device="cuda:3")


def test_sampling_uses_the_current_cache_keyword(tmp_path, caplog):
    """transformers 5 logs (once per process) and warns about `past_key_values`; the sampler and the HF engine
    pass the cache under its current name, so neither appears (the logger's once-cache is reset first)."""
    from transformers.utils import logging as hf_logging

    from alignfast.rollout._cache_api import cache_keyword

    trainer, tok = _tiny_trainer(tmp_path)
    if cache_keyword(trainer.model) != "cache":
        pytest.skip("transformers < 5 has only past_key_values")
    hf_logging.get_logger("transformers.utils.generic").warning_once.cache_clear() if hasattr(
        hf_logging.get_logger("transformers.utils.generic").warning_once, "cache_clear") else None
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.rollout(["what is a cat", "why fish"])
    finally:
        hf_logging.disable_propagation()
    assert "past_key_values" not in caplog.text
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]
