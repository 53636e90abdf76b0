"""ppo_loss against the float64 reference: loss, every stat, and the fused gradients against autograd of
the reference (ties and both clip sides included); gradcheck, opcheck, torch.compile, the reference
fallback, masks (padding both ends, holes, fully masked rows), T=1, B=1, T=4096, and bad input.

Tolerances: float64 inputs run in float64 and must agree with the reference to rounding (1e-10).
float32 inputs accumulate in float32 per token and in double across rows: 1e-5 relative / 1e-6 absolute.
bf16 inputs: the kernel computes in float32 on the bf16 values, so against the float64 reference on the
same bf16 values the loss matches to float32 rounding; the gradients come back rounded to bf16 (2^-8).
"""

from __future__ import annotations

import pytest
import torch

import alignfast.ops as ops
from alignfast import reference
from alignfast.ops import AlignfastArgumentError, force_backend
from alignfast.ops.ppo_loss import STATS
from tests.utils import assert_close, random_mask

TENSORS = ("logprobs", "old_logprobs", "advantages", "values", "old_values", "returns")


def make_inputs(B, T, *, dtype=torch.float32, seed=0, mask=None, device="cpu", spread=0.3):
    """Inputs where a good share of tokens is clipped on each side (ratio and value) and most are not."""
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old_logprobs = logprobs + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    old_values = values + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    returns = values + torch.randn(B, T, generator=g, dtype=torch.float64)
    if mask is None:
        mask = random_mask(B, T, generator=g)
    tensors = [t.to(dtype).to(device) for t in (logprobs, old_logprobs, advantages, values, old_values, returns)]
    return tensors, mask.to(device)


def leaf(tensors):
    """logprobs and values as fresh leaves that require grad."""
    tensors = list(tensors)
    tensors[0] = tensors[0].detach().clone().requires_grad_(True)
    tensors[3] = tensors[3].detach().clone().requires_grad_(True)
    return tensors


def reference_f64(tensors, mask, **kw):
    """Loss, stats and autograd gradients of the spec on the same values, in float64 on CPU."""
    t64 = leaf([t.detach().to("cpu", torch.float64) for t in tensors])
    loss, stats = reference.ppo_loss(*t64, mask.cpu(), **kw)
    grads = torch.autograd.grad(loss, [t64[0], t64[3]])
    return loss.detach(), stats, grads


def check_against_reference(tensors, mask, *, tol, grad_tol=None, **kw):
    tensors = leaf(tensors)
    loss, stats = ops.ppo_loss(*tensors, mask, **kw)
    ref_loss, ref_stats, ref_grads = reference_f64(tensors, mask, **kw)
    want_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    assert loss.dtype == want_dtype and loss.dim() == 0
    assert_close(loss, ref_loss, name="loss", **tol)
    assert set(stats) == set(STATS)
    for name in STATS:
        assert stats[name].dtype == want_dtype and not stats[name].requires_grad
        assert_close(stats[name], ref_stats[name], name=name, **tol)
    grads = torch.autograd.grad(loss, [tensors[0], tensors[3]])
    for name, g, r, t in zip(("d/dlogprobs", "d/dvalues"), grads, ref_grads, (tensors[0], tensors[3])):
        assert g.dtype == t.dtype, f"{name}: gradient dtype {g.dtype} != input dtype {t.dtype}"
        assert_close(g, r, name=name, **(grad_tol or tol))
    return loss, stats, grads


TOL64 = dict(rtol=1e-10, atol=1e-12)
TOL32 = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("B,T", [(1, 1), (1, 5), (7, 1), (9, 37), (2, 4096)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(B, T, dtype):
    tensors, mask = make_inputs(B, T, dtype=dtype, seed=B * 100 + T)
    check_against_reference(tensors, mask, tol=TOL64 if dtype == torch.float64 else TOL32)


@pytest.mark.parametrize("cliprange,cliprange_value,vf_coef", [(0.2, 0.2, 0.1), (0.0, 0.0, 1.0), (0.05, 10.0, 0.5),
                                                                (1e6, 1e6, 0.0)])
def test_clip_settings(cliprange, cliprange_value, vf_coef):
    tensors, mask = make_inputs(11, 29, dtype=torch.float64, seed=3, spread=0.5)
    _, stats, _ = check_against_reference(tensors, mask, tol=TOL64, cliprange=cliprange,
                                          cliprange_value=cliprange_value, vf_coef=vf_coef)
    if cliprange == 0.2:  # the inputs exercise both the clipped and the unclipped branch
        assert 0.05 < stats["clipfrac"].item() < 0.95 and 0.05 < stats["vf_clipfrac"].item() < 0.95


def test_ties_inside_the_clip_range_follow_autograd():
    """The first PPO epoch: logprobs == old_logprobs and values == old_values, so both maxes tie exactly."""
    tensors, mask = make_inputs(5, 11, dtype=torch.float64, seed=30)
    tensors[1] = tensors[0].clone()
    tensors[4] = tensors[3].clone()
    _, stats, _ = check_against_reference(tensors, mask, tol=TOL64)
    assert stats["ratio"].item() == 1.0 and stats["clipfrac"].item() == 0.0 and stats["vf_clipfrac"].item() == 0.0


def test_exactly_on_a_clip_bound_counts_as_clipped():
    """A ratio or value exactly on a bound: the clipped branch passes no gradient and ties with the other,
    so the token gets half the unclipped gradient (csrc/ppo_loss_math.h: a valid subgradient, torch's for
    the ratio clamp)."""
    eps, eps_v = 0.25, 0.5  # exact in binary
    ratio = torch.tensor([[1.25, 0.75, 1.0, 1.0]], dtype=torch.float64)
    logprobs = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    old_logprobs = -ratio.log()
    assert torch.equal(torch.exp(logprobs - old_logprobs), ratio)  # the bounds are hit exactly
    advantages = torch.tensor([[-2.0, 3.0, 1.0, 1.0]], dtype=torch.float64)
    old_values = torch.zeros(1, 4, dtype=torch.float64)
    values = torch.tensor([[0.0, 0.0, 0.5, -0.5]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[0.0, 0.0, -1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = ops.ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, mask,
                               cliprange=eps, cliprange_value=eps_v, vf_coef=1.0)
    grad_lp, grad_v = torch.autograd.grad(loss, [logprobs, values])
    n = 4
    unclipped_lp = -advantages * ratio / n
    assert torch.equal(grad_lp[0, :2], 0.5 * unclipped_lp[0, :2])  # on the bound: half
    assert torch.equal(grad_lp[0, 2:], unclipped_lp[0, 2:])  # inside: all of it
    unclipped_v = 0.5 * 2 * (values - returns) / n
    assert torch.equal(grad_v[0, 2:], 0.5 * unclipped_v[0, 2:].detach())
    assert stats["clipfrac"].item() == 0.0 and stats["vf_clipfrac"].item() == 0.0  # ties are not "clipped"


def test_mask_shapes_and_fully_masked_rows():
    T = 17
    mask = torch.zeros(5, T, dtype=torch.bool)
    mask[0, 3:8] = True
    mask[1, [0, 5, 16]] = True
    mask[2, T - 1] = True
    mask[4] = True
    tensors, _ = make_inputs(5, T, dtype=torch.float64, seed=4)
    _, _, grads = check_against_reference(tensors, mask, tol=TOL64)
    for g in grads:
        assert torch.all(g[~mask] == 0)


def test_no_valid_token_gives_zero_loss_and_zero_gradients():
    tensors, _ = make_inputs(3, 4, seed=5)
    tensors = leaf(tensors)
    loss, stats = ops.ppo_loss(*tensors, torch.zeros(3, 4, dtype=torch.bool))
    assert loss.item() == 0 and all(v.item() == 0 for v in stats.values())
    loss.backward()
    assert torch.equal(tensors[0].grad, torch.zeros(3, 4)) and torch.equal(tensors[3].grad, torch.zeros(3, 4))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_garbage_at_masked_positions_is_skipped(backend):
    """On the reference (the spec, the trainer's reference backend, the fallback without the extension) too: it
    masked the loss after computing it, and 0 * NaN in the backward gave NaN gradients at masked values."""
    tensors, mask = make_inputs(6, 21, seed=6)
    clean = leaf(tensors)
    with force_backend(backend):
        loss_clean, _ = ops.ppo_loss(*clean, mask)
    loss_clean.backward()
    dirty = [t.clone() for t in tensors]
    for t, bad in zip(dirty, (float("nan"), float("inf"), float("-inf"), float("nan"), float("inf"), float("nan"))):
        t[~mask] = bad
    dirty = leaf(dirty)
    with force_backend(backend):
        loss_dirty, _ = ops.ppo_loss(*dirty, mask)
    loss_dirty.backward()
    assert torch.equal(loss_dirty, loss_clean)
    assert torch.equal(dirty[0].grad, clean[0].grad) and torch.equal(dirty[3].grad, clean[3].grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_nan_old_value_at_a_valid_token_makes_the_value_loss_nan(dtype):
    """NaN clip bounds: torch.clamp (the reference) returns NaN, while the kernel's comparisons passed the value
    through, so a corrupted rollout gave a finite value loss and gradient. A NaN in the AVX2 blocks (T = 19: two
    blocks of 8) and in the scalar tail, both kernels (float32 and float64)."""
    tensors, mask = make_inputs(2, 19, dtype=dtype, seed=8, mask=torch.ones(2, 19, dtype=torch.bool))
    tensors[4][0, 3] = tensors[4][1, 17] = float("nan")
    tensors = leaf(tensors)
    loss, stats = ops.ppo_loss(*tensors, mask)
    d_values = torch.autograd.grad(loss, tensors[3])[0]
    ref_loss, ref_stats, (_, ref_d_values) = reference_f64(tensors, mask)
    assert torch.isnan(loss) and torch.isnan(stats["vf_loss"]) and torch.isnan(ref_loss)
    assert torch.equal(torch.isnan(d_values), torch.isnan(ref_d_values))
    assert torch.isnan(d_values[0, 3]) and torch.isnan(d_values[1, 17]) and torch.isfinite(d_values[0, :3]).all()


def test_bf16_inputs_give_float32_loss_and_bf16_gradients():
    tensors, mask = make_inputs(8, 40, dtype=torch.bfloat16, seed=7)
    check_against_reference(tensors, mask, tol=TOL32, grad_tol=dict(rtol=2**-7, atol=1e-6))


def test_grad_output_scaling_and_partial_requires_grad():
    tensors, mask = make_inputs(4, 10, dtype=torch.float64, seed=8)
    only_values = list(tensors)
    only_values[3] = tensors[3].clone().requires_grad_(True)
    loss, _ = ops.ppo_loss(*only_values, mask)
    (3.5 * loss).backward()
    t64 = leaf(tensors)
    ref_loss, _ = reference.ppo_loss(*t64, mask)
    (3.5 * ref_loss).backward()
    assert_close(only_values[3].grad, t64[3].grad, name="d/dvalues", **TOL64)


def test_rollout_targets_are_detached():
    """old_logprobs, advantages, old_values and returns are targets: no gradient flows into them."""
    tensors, mask = make_inputs(3, 6, dtype=torch.float64, seed=9)
    tensors = [t.clone().requires_grad_(True) for t in tensors]
    loss, _ = ops.ppo_loss(*tensors, mask)
    loss.backward()
    assert tensors[0].grad is not None and tensors[3].grad is not None
    assert all(tensors[i].grad is None for i in (1, 2, 4, 5))


def test_no_grad_mode_skips_the_gradients():
    tensors, mask = make_inputs(5, 9, seed=10)
    with_grad, _ = ops.ppo_loss(*leaf(tensors), mask)
    with torch.no_grad():
        without, stats = ops.ppo_loss(*leaf(tensors), mask)
    assert torch.equal(with_grad.detach(), without) and not without.requires_grad
    out = torch.ops.alignfast.ppo_loss(*tensors, mask, 0.2, 0.2, 0.1, False)
    assert out[2].numel() == 0 and out[3].numel() == 0


def test_gradcheck():
    tensors, mask = make_inputs(3, 7, dtype=torch.float64, seed=11)
    lp, v = leaf(tensors)[0], leaf(tensors)[3]

    def loss_of(logprobs, values):
        return ops.ppo_loss(logprobs, tensors[1], tensors[2], values, tensors[4], tensors[5], mask)[0]

    assert torch.autograd.gradcheck(loss_of, (lp, v))


def _op_args(tensors, mask, compute_grad):
    return (*tensors, mask, 0.2, 0.2, 0.1, compute_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    tensors, mask = make_inputs(4, 9, dtype=dtype, seed=12)
    torch.library.opcheck(torch.ops.alignfast.ppo_loss.default, _op_args(leaf(tensors), mask, True))
    torch.library.opcheck(torch.ops.alignfast.ppo_loss.default, _op_args(tensors, mask, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_backward_scale_op(dtype):
    """The CPU backward (ppo_loss_backward: grad_loss / n times the saved per-token gradients, on the calling
    thread for small calls) equals the same scale done with torch ops, for any upstream gradient and for each
    subset of the gradients; its schema passes opcheck."""
    from alignfast.ops.ppo_loss import _scale_with_torch

    tensors, mask = make_inputs(5, 11, dtype=dtype, seed=21)
    loss_out, stats, g_lp, g_v = torch.ops.alignfast.ppo_loss(*_op_args(tensors, mask, True))
    grad_loss = torch.tensor(-2.5, dtype=loss_out.dtype)
    for need in ((True, True), (True, False), (False, True)):
        got = torch.ops.alignfast.ppo_loss_backward(grad_loss, stats, g_lp, g_v, *need)
        want = _scale_with_torch(grad_loss, stats, g_lp, g_v, *need)
        for g, w, asked in zip(got, want, need):
            if asked:
                assert g.dtype == w.dtype and g.shape == w.shape
                torch.testing.assert_close(g, w, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
            else:
                assert g.numel() == 0
        torch.library.opcheck(torch.ops.alignfast.ppo_loss_backward.default, (grad_loss, stats, g_lp, g_v, *need))
    # Through autograd with an upstream gradient other than 1, against the reference's gradients.
    x = leaf(tensors)
    loss, _ = ops.ppo_loss(*x, mask)
    (loss * -2.5).backward()
    r = leaf([t.double() for t in tensors])
    r_loss, _ = reference.ppo_loss(*r, mask)
    (r_loss * -2.5).backward()
    tol = dict(rtol=2e-2, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x[0].grad.double(), r[0].grad, **tol)
    torch.testing.assert_close(x[3].grad.double(), r[3].grad, **tol)


def test_torch_compile_fullgraph_forward_and_backward():
    tensors, mask = make_inputs(4, 16, seed=13)

    def step(logprobs, old_logprobs, advantages, values, old_values, returns, mask):
        loss, stats = ops.ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, mask)
        return loss, stats["clipfrac"]

    eager = leaf(tensors)
    loss, clipfrac = step(*eager, mask)
    loss.backward()
    compiled_inputs = leaf(tensors)
    c_loss, c_clipfrac = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled_inputs, mask)
    c_loss.backward()
    assert torch.equal(c_loss, loss) and torch.equal(c_clipfrac, clipfrac)
    assert torch.equal(compiled_inputs[0].grad, eager[0].grad) and torch.equal(compiled_inputs[3].grad, eager[3].grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_fallback_behaves_the_same(dtype):
    tensors, mask = make_inputs(6, 13, dtype=dtype, seed=14)
    fused = leaf(tensors)
    loss, stats = ops.ppo_loss(*fused, mask)
    loss.backward()
    fallback = leaf(tensors)
    with force_backend("reference"):
        ref_loss, ref_stats = ops.ppo_loss(*fallback, mask)
    ref_loss.backward()
    assert ref_loss.dtype == loss.dtype == torch.float32
    assert_close(loss, ref_loss, name="loss", **TOL32)
    for name in STATS:
        assert ref_stats[name].dtype == torch.float32
        assert_close(stats[name], ref_stats[name], name=name, **TOL32)
    grad_tol = TOL32 if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    assert fallback[0].grad.dtype == dtype
    assert_close(fused[0].grad, fallback[0].grad, name="d/dlogprobs", **grad_tol)
    assert_close(fused[3].grad, fallback[3].grad, name="d/dvalues", **grad_tol)


BAD_INPUTS = [
    ("logprobs", dict(logprobs=torch.zeros(2, 3, 1))),
    ("logprobs", dict(logprobs=torch.zeros(2, 3, dtype=torch.int32))),
    ("old_logprobs", dict(old_logprobs=torch.zeros(2, 2))),
    ("advantages", dict(advantages=torch.zeros(2, 3, dtype=torch.float64))),
    ("values", dict(values=torch.zeros(3, 3))),
    ("old_values", dict(old_values=None)),
    ("returns", dict(returns=torch.zeros(2, 3, dtype=torch.float16))),
    ("mask", dict(mask=torch.ones(2, 3, dtype=torch.float32))),
    ("mask", dict(mask=torch.ones(1, 3, dtype=torch.bool))),
    ("cliprange", dict(cliprange=-0.1)),
    ("cliprange", dict(cliprange=float("nan"))),
    ("cliprange_value", dict(cliprange_value=float("inf"))),
    ("cliprange_value", dict(cliprange_value=-1.0)),
    ("vf_coef", dict(vf_coef=float("nan"))),
    ("vf_coef", dict(vf_coef=-0.5)),
]


@pytest.mark.parametrize("name,changes", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(name, changes):
    tensors, mask = make_inputs(2, 3, seed=15)
    args = dict(zip(TENSORS, tensors), mask=mask, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1) | changes
    positional = [args.pop(k) for k in (*TENSORS, "mask")]
    with pytest.raises(AlignfastArgumentError, match=f"'{name}'"):
        ops.ppo_loss(*positional, **args)


def test_direct_op_call_checks_arguments():
    tensors, mask = make_inputs(2, 3, seed=16)
    with pytest.raises(RuntimeError, match="'cliprange'"):
        torch.ops.alignfast.ppo_loss(*tensors, mask, -1.0, 0.2, 0.1, False)
    with pytest.raises(RuntimeError, match="'values'"):
        torch.ops.alignfast.ppo_loss(*tensors[:3], tensors[3].double(), *tensors[4:], mask, 0.2, 0.2, 0.1, False)


def test_empty_batch_or_sequence():
    for B, T in ((0, 5), (3, 0)):
        tensors, mask = make_inputs(B, T, seed=17, mask=torch.ones(B, T, dtype=torch.bool))
        tensors = leaf(tensors)
        loss, stats = ops.ppo_loss(*tensors, mask)
        assert loss.item() == 0 and all(v.item() == 0 for v in stats.values())
        loss.backward()
        assert tensors[0].grad.shape == (B, T) and tensors[3].grad.shape == (B, T)
