"""ppo_policy_loss_from_logits (fused log-prob pass) against the float64 reference.

Tolerances: the loss and stats are means of float32 per-token terms (logprob error <= 2e-5 abs,
amplified by ratio ~ 1 and |A| ~ 1): rtol 1e-4, atol 1e-5. clipfrac counts tokens on either side of a
clip boundary; random inputs keep the ratios away from 1 +- eps by more than the logprob error, so it
must match exactly up to float32 rounding of the mean. dlogits tolerances as in test_token_logprobs.
"""

from __future__ import annotations

import pytest
import torch

from alignfast import reference
from alignfast.ops import AlignfastArgumentError, ppo_policy_loss_from_logits
from alignfast.ops._library import has_kernel
from tests.utils import assert_close, random_mask

LOSS_TOL = dict(rtol=1e-4, atol=1e-5)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-4, atol=2e-7, rel=2e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-9),
    torch.float64: dict(rtol=1e-9, atol=1e-14),
}

pytestmark = pytest.mark.skipif(not has_kernel("token_logprobs", "cpu"),
                                reason="alignfast._C has no CPU kernel (extension not built)")


def make_batch(B, T, V, dtype, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        lp = reference.token_logprobs(logits.double(), tokens)
    # old log-probs near the current ones, so that some ratios fall inside the clip range and some outside
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, T, generator=g)
    return logits, tokens, old, adv


def compare(logits, tokens, old, adv, mask, **kw):
    x = logits.clone().requires_grad_()
    loss, stats = ppo_policy_loss_from_logits(x, tokens, old, adv, mask, **kw)
    loss.backward()
    xr = logits.detach().double().requires_grad_()
    r_loss, r_stats = reference.ppo_policy_loss_from_logits(xr, tokens, old.double(), adv.double(), mask, **kw)
    r_loss.backward()
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert_close(loss, r_loss, name="loss", **LOSS_TOL)
    assert set(stats) == {"pg_loss", "entropy", "clipfrac", "approxkl", "ratio"} == set(r_stats)
    for key in stats:
        assert not stats[key].requires_grad
        assert_close(stats[key], r_stats[key], name=key, **LOSS_TOL)
    assert x.grad.dtype == logits.dtype
    assert_close(x.grad, xr.grad, name="dlogits", **GRAD_TOL[logits.dtype])
    return loss, stats, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_matches_reference(dtype, entropy_coef, temperature):
    B, T, V = 5, 9, 1000
    logits, tokens, old, adv = make_batch(B, T, V, dtype)
    mask = random_mask(B, T)
    _, stats, grad = compare(logits, tokens, old, adv, mask, temperature=temperature, cliprange=0.2,
                             entropy_coef=entropy_coef)
    assert 0 < stats["clipfrac"] < 1, "want tokens both inside and outside the clip range"
    assert (grad[~mask] == 0).all()


def test_float64_and_gradcheck():
    logits, tokens, old, adv = make_batch(2, 4, 11, torch.float64)
    mask = random_mask(2, 4)
    mask[0, 0] = True
    compare(logits, tokens, old, adv, mask, entropy_coef=0.05)
    x = logits.clone().requires_grad_()
    f = lambda z: ppo_policy_loss_from_logits(z, tokens, old.double(), adv.double(), mask, entropy_coef=0.05,  # noqa: E731
                                              temperature=0.7)[0]
    assert torch.autograd.gradcheck(f, (x,))


def test_everything_masked_gives_zero_loss_and_gradient():
    logits, tokens, old, adv = make_batch(2, 3, 50, torch.float32)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    tokens[0, 0] = 10_000  # never read: masked
    x = logits.clone().requires_grad_()
    loss, stats = ppo_policy_loss_from_logits(x, tokens, old, adv, mask, entropy_coef=0.1)
    loss.backward()
    assert loss.item() == 0 and all(v.item() == 0 for v in stats.values())
    assert (x.grad == 0).all()


def test_large_vocabulary_few_rows():
    logits, tokens, old, adv = make_batch(1, 3, 151936, torch.bfloat16)
    compare(logits, tokens, old, adv, torch.ones(1, 3, dtype=torch.bool), entropy_coef=0.01)


def test_bad_arguments():
    logits, tokens, old, adv = make_batch(2, 3, 20, torch.float32)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(AlignfastArgumentError, match="'old_logprobs'"):
        ppo_policy_loss_from_logits(logits, tokens, old[:, :2], adv, mask)
    with pytest.raises(AlignfastArgumentError, match="'advantages'"):
        ppo_policy_loss_from_logits(logits, tokens, old, adv.long(), mask)
    with pytest.raises(AlignfastArgumentError, match="'mask'"):
        ppo_policy_loss_from_logits(logits, tokens, old, adv, None)
    with pytest.raises(AlignfastArgumentError, match="'cliprange'"):
        ppo_policy_loss_from_logits(logits, tokens, old, adv, mask, cliprange=-0.1)
    with pytest.raises(AlignfastArgumentError, match="'entropy_coef'"):
        ppo_policy_loss_from_logits(logits, tokens, old, adv, mask, entropy_coef=float("inf"))
    with pytest.raises(AlignfastArgumentError, match="'tokens'"):
        bad = tokens.clone()
        bad[0, 0] = 20
        ppo_policy_loss_from_logits(logits, bad, old, adv, mask)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_arguments_name_the_argument_on_every_backend(backend):
    """The reference fallback (no extension, or ALIGNFAST_BACKEND=reference) checks what the fused path checks:
    it used to fail inside torch.gather on a bad token id and to accept temperature 0."""
    from alignfast.ops import force_backend

    logits, tokens, old, adv = make_batch(2, 3, 20, torch.float32)
    mask = torch.ones(2, 3, dtype=torch.bool)
    bad = tokens.clone()
    bad[1, 2] = 20
    with force_backend(backend):
        with pytest.raises(AlignfastArgumentError, match="'tokens' holds token id 20"):
            ppo_policy_loss_from_logits(logits, bad, old, adv, mask)
        with pytest.raises(AlignfastArgumentError, match="'temperature'"):
            ppo_policy_loss_from_logits(logits, tokens, old, adv, mask, temperature=0.0)
        with pytest.raises(AlignfastArgumentError, match="'mask'"):
            ppo_policy_loss_from_logits(logits, tokens, old, adv, torch.ones(2, 4, dtype=torch.bool))
        with pytest.raises(AlignfastArgumentError, match="'tokens'"):
            ppo_policy_loss_from_logits(logits, tokens[:, :2], old, adv, mask)


@pytest.mark.gpu
def test_cuda_large_vocabulary():
    logits, tokens, old, adv = make_batch(4, 8, 151936, torch.bfloat16)
    mask = random_mask(4, 8)
    x = logits.cuda().requires_grad_()
    loss, stats = ppo_policy_loss_from_logits(x, tokens.cuda(), old.cuda(), adv.cuda(), mask.cuda(), entropy_coef=0.01)
    loss.backward()
    xr = logits.double().requires_grad_()
    r_loss, r_stats = reference.ppo_policy_loss_from_logits(xr, tokens, old.double(), adv.double(), mask,
                                                            entropy_coef=0.01)
    r_loss.backward()
    assert_close(loss, r_loss, name="loss", **LOSS_TOL)
    for key in r_stats:
        assert_close(stats[key], r_stats[key], name=key, **LOSS_TOL)
    assert_close(x.grad, xr.grad, name="dlogits", **GRAD_TOL[torch.bfloat16])
