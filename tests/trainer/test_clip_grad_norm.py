"""The fast backend's gradient clipping is torch.nn.utils.clip_grad_norm_: bit for bit when it skips the
multiply by 1.0 (no pass over the gradients) because the global norm is within max_norm, and to one float32
rounding when a fused AdamW divides by 1 / c instead (its grad_scale)."""

import math

import pytest
import torch

from alignfast.trainer.ppo_core import clip_grad_norm, optimizer_step


def params_with_grads(scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(7, 5), (3,), (2, 2, 4)]]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * scale
    ps.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: ignored, as torch does
    return ps


@pytest.mark.parametrize("scale", [1e-3, 0.1, 10.0, float("nan"), float("inf")])
@pytest.mark.parametrize("max_norm", [0.5, 1.0])
def test_clip_grad_norm_is_torchs(scale, max_norm, monkeypatch):
    expected, got = params_with_grads(scale), params_with_grads(scale)
    n_expected = torch.nn.utils.clip_grad_norm_(expected, max_norm, foreach=True)
    unit = bool(max_norm / (n_expected + 1e-6) >= 1.0)
    if unit:  # nothing to scale: the gradients must not even be visited by a multiply
        monkeypatch.setattr(torch, "_foreach_mul_", lambda *a, **k: pytest.fail("multiplied by 1.0"))
    n_got = clip_grad_norm(got, max_norm, skip_unit_scale=True)
    assert torch.equal(n_expected, n_got) or (math.isnan(n_expected) and math.isnan(n_got))
    for pe, pg in zip(expected, got):
        if pe.grad is None:
            assert pg.grad is None
        else:
            assert torch.equal(pe.grad.nan_to_num(7.0), pg.grad.nan_to_num(7.0))
    if scale == 1e-3:  # both branches are exercised
        assert unit
    if scale >= 10.0 or math.isnan(scale):
        assert not unit


def test_without_skip_it_is_torchs_call():
    expected, got = params_with_grads(0.01), params_with_grads(0.01)
    assert torch.equal(torch.nn.utils.clip_grad_norm_(expected, 1.0, foreach=True),
                       clip_grad_norm(got, 1.0, skip_unit_scale=False))
    for pe, pg in zip(expected[:3], got[:3]):
        assert torch.equal(pe.grad, pg.grad)


@pytest.mark.parametrize("scale", [1e-3, 10.0, float("inf")])
@pytest.mark.parametrize("fused", [True, False])
def test_a_clip_below_one_goes_to_the_fused_adamw_as_its_grad_scale(scale, fused):
    expected, got = params_with_grads(scale, seed=1), params_with_grads(scale, seed=1)
    opt_e = torch.optim.AdamW(expected, lr=0.1, weight_decay=0.01, fused=True)
    opt_g = torch.optim.AdamW(got, lr=0.1, weight_decay=0.01, **({"fused": True} if fused else {"foreach": True}))
    for step in range(2):
        if step:  # a second step: the state (m, v) carries the first one
            for pe, pg in zip(expected[:3], got[:3]):
                pe.grad = pg.grad = None
                pe.grad = torch.full_like(pe, scale * 0.5)
                pg.grad = torch.full_like(pg, scale * 0.5)
        torch.nn.utils.clip_grad_norm_(expected, 1.0, foreach=True)
        opt_e.step()
        clip_grad_norm(got, 1.0, skip_unit_scale=True, optimizer=opt_g)
        handed = "grad_scale" in opt_g.__dict__
        assert handed == (fused and scale == 10.0)  # only a finite coefficient below 1, only to a fused AdamW
        optimizer_step(opt_g)
        assert "grad_scale" not in opt_g.__dict__  # valid for one step
        for pe, pg in zip(expected[:3], got[:3]):
            if scale == 1e-3 and fused:  # the multiply by 1.0 skipped: torch's result bit for bit
                assert torch.equal(pe, pg)
            else:  # fused vs foreach AdamW, or g / (1 / c) vs g * c: float32 rounding
                torch.testing.assert_close(pg, pe, rtol=2e-6, atol=1e-7, equal_nan=True)
