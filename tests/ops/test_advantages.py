"""compute_advantages against the float64 reference: every KL estimator, gamma/lam at the ends of [0, 1],
whitening on and off, masks with padding at both ends, holes and fully masked rows, T=1, B=1, T=4096;
plus opcheck, torch.compile, determinism, the reference fallback and bad input.

Tolerances: float64 inputs run the kernel in float64, so it must agree with the float64 reference to
rounding (1e-10). float32/bf16/fp16 inputs run in float32: GAE sums up to T terms, so we allow 1e-5
relative plus 1e-4 absolute against the float64 reference on the same (rounded) inputs.
"""

from __future__ import annotations

import pytest
import torch

import alignfast.ops as ops
from alignfast import reference
from alignfast.ops import AlignfastArgumentError, force_backend
from tests.utils import assert_close, random_mask

ESTIMATORS = ("k1", "k2", "k3", "abs")
OUTPUTS = ("rewards", "advantages", "returns", "kl")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-4)}


def make_inputs(B, T, *, dtype=torch.float32, seed=0, mask=None, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4  # log-probabilities are <= 0
    ref_logprobs = logprobs + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    scores = 2 * torch.randn(B, generator=g, dtype=torch.float64)
    if mask is None:
        mask = random_mask(B, T, generator=g)
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return cast(logprobs), cast(ref_logprobs), cast(values), cast(scores), mask.to(device)


def reference_f64(logprobs, ref_logprobs, values, scores, mask, **kw):
    """The spec on the same inputs (after any rounding to their dtype), computed in float64 on CPU."""
    f64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    return reference.compute_advantages(f64(logprobs), f64(ref_logprobs), f64(values), f64(scores), mask.cpu(), **kw)


def check_against_reference(inputs, *, tol_dtype, **kw):
    out = ops.compute_advantages(*inputs, **kw)
    want = reference_f64(*inputs, **kw)
    expected_dtype = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    for name, o, r in zip(OUTPUTS, out, want):
        assert o.dtype == expected_dtype, f"{name}: dtype {o.dtype}"
        assert o.device == inputs[0].device
        assert_close(o, r, name=f"{name} ({kw})", **TOL[tol_dtype])
    return out


@pytest.mark.parametrize("kl_estimator", ESTIMATORS)
@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_every_estimator(kl_estimator, whiten, dtype):
    inputs = make_inputs(10, 53, dtype=dtype, seed=1)
    check_against_reference(inputs, tol_dtype=dtype, kl_coef=0.05, kl_estimator=kl_estimator, gamma=0.99, lam=0.95,
                            whiten=whiten)


@pytest.mark.parametrize("gamma,lam", [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0), (0.5, 0.9)])
@pytest.mark.parametrize("whiten", [True, False])
def test_gamma_lam_at_the_ends(gamma, lam, whiten):
    inputs = make_inputs(8, 41, dtype=torch.float64, seed=2)
    check_against_reference(inputs, tol_dtype=torch.float64, kl_coef=0.1, gamma=gamma, lam=lam, whiten=whiten)


@pytest.mark.parametrize("B,T", [(1, 1), (1, 2), (1, 300), (6, 1), (4, 7), (33, 17), (3, 4096)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shapes(B, T, dtype):
    inputs = make_inputs(B, T, dtype=dtype, seed=B * 1000 + T)
    check_against_reference(inputs, tol_dtype=dtype, kl_coef=0.02, kl_estimator="k3", gamma=1.0, lam=0.95)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype):
    inputs = make_inputs(6, 64, dtype=dtype, seed=3)
    check_against_reference(inputs, tol_dtype=torch.float32, kl_coef=0.1, kl_estimator="k2")


def test_mask_shapes_that_break_scans():
    T = 23
    mask = torch.zeros(6, T, dtype=torch.bool)
    mask[0, 5:9] = True  # padding both ends
    mask[1, [0, 3, 4, 11, 22]] = True  # holes, first and last position
    mask[2, T - 1] = True  # a single valid token at the end
    mask[3, 0] = True  # a single valid token at the start
    mask[4] = True  # full row
    # row 5: fully masked
    inputs = make_inputs(6, T, dtype=torch.float64, seed=4, mask=mask)
    rewards, advantages, returns, kl = check_against_reference(inputs, tol_dtype=torch.float64, kl_coef=0.1)
    scores = inputs[3]
    for out in (rewards, advantages, returns, kl):
        assert torch.all(out[~mask] == 0)
    # the score lands on the last valid token of each row, and nowhere for the fully masked row
    k1 = inputs[0] - inputs[1]
    for b, last in ((0, 8), (1, 22), (2, T - 1), (3, 0), (4, T - 1)):
        assert rewards[b, last].item() == pytest.approx((-0.1 * k1[b, last] + scores[b]).item(), abs=1e-12)


def test_fully_masked_batch_is_zero_not_nan():
    inputs = make_inputs(4, 9, seed=5, mask=torch.zeros(4, 9, dtype=torch.bool))
    for out in ops.compute_advantages(*inputs, kl_coef=0.1, whiten=True):
        assert torch.equal(out, torch.zeros_like(out))


def test_single_valid_token_whitens_to_zero():
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 2] = True
    _, advantages, _, _ = ops.compute_advantages(*make_inputs(3, 5, seed=6, mask=mask), kl_coef=0.1, whiten=True)
    assert torch.equal(advantages, torch.zeros_like(advantages))


def test_garbage_at_masked_positions_is_skipped():
    """Masked positions are skipped, not multiplied by 0: inf/NaN there cannot reach the outputs."""
    logprobs, ref_logprobs, values, scores, mask = make_inputs(8, 31, seed=7)
    clean = ops.compute_advantages(logprobs, ref_logprobs, values, scores, mask, kl_coef=0.1, kl_estimator="k3")
    dirty = [t.clone() for t in (logprobs, ref_logprobs, values)]
    for t, bad in zip(dirty, (float("nan"), float("inf"), float("-inf"))):
        t[~mask] = bad
    out = ops.compute_advantages(*dirty, scores, mask, kl_coef=0.1, kl_estimator="k3")
    for name, a, b in zip(OUTPUTS, out, clean):
        assert torch.equal(a, b), name


def test_integer_mask_and_non_contiguous_inputs():
    logprobs, ref_logprobs, values, scores, mask = make_inputs(12, 20, seed=8)
    want = ops.compute_advantages(logprobs, ref_logprobs, values, scores, mask, kl_coef=0.1)
    # transposed storage: same values, non-contiguous views
    t = lambda x: x.t().contiguous().t()  # noqa: E731
    got = ops.compute_advantages(t(logprobs), t(ref_logprobs), t(values), scores, mask.to(torch.int32), kl_coef=0.1)
    for name, a, b in zip(OUTPUTS, got, want):
        assert torch.equal(a, b), name


def test_deterministic_and_independent_of_thread_count():
    inputs = make_inputs(64, 333, seed=9)
    first = ops.compute_advantages(*inputs, kl_coef=0.1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.compute_advantages(*inputs, kl_coef=0.1)
    finally:
        torch.set_num_threads(threads)
    again = ops.compute_advantages(*inputs, kl_coef=0.1)
    for name, a, b, c in zip(OUTPUTS, first, single, again):
        assert torch.equal(a, b) and torch.equal(a, c), name


def test_outputs_carry_no_gradient():
    logprobs, ref_logprobs, values, scores, mask = make_inputs(3, 8, seed=10)
    logprobs.requires_grad_(True)
    values.requires_grad_(True)
    for out in ops.compute_advantages(logprobs, ref_logprobs, values, scores, mask, kl_coef=0.1):
        assert not out.requires_grad


@pytest.mark.parametrize("whiten", [True, False])
def test_reference_fallback_behaves_the_same(whiten):
    """force_backend('reference') (also what a missing extension falls back to) gives the same results."""
    inputs = make_inputs(7, 19, dtype=torch.bfloat16, seed=11)
    fused = ops.compute_advantages(*inputs, kl_coef=0.1, kl_estimator="abs", whiten=whiten)
    with force_backend("reference"):
        fallback = ops.compute_advantages(*inputs, kl_coef=0.1, kl_estimator="abs", whiten=whiten)
    for name, a, b in zip(OUTPUTS, fused, fallback):
        assert a.dtype == b.dtype == torch.float32, name
        assert_close(a, b, name=name, rtol=1e-5, atol=1e-5)


def _op_args(inputs, **kw):
    args = dict(kl_coef=0.1, kl_estimator="k1", gamma=0.99, lam=0.95, whiten=True) | kw
    return (*inputs, args["kl_coef"], args["kl_estimator"], args["gamma"], args["lam"], args["whiten"])


@pytest.mark.parametrize("dtype,kw", [(torch.float32, {}), (torch.float64, dict(whiten=False, kl_estimator="k3")),
                                      (torch.bfloat16, dict(kl_estimator="abs"))])
def test_opcheck(dtype, kw):
    inputs = make_inputs(5, 12, dtype=dtype, seed=12)
    torch.library.opcheck(torch.ops.alignfast.compute_advantages.default, _op_args(inputs, **kw))


def test_torch_compile_fullgraph():
    inputs = make_inputs(4, 16, seed=13)

    def step(logprobs, ref_logprobs, values, scores, mask):
        rewards, advantages, returns, kl = ops.compute_advantages(logprobs, ref_logprobs, values, scores, mask,
                                                                  kl_coef=0.1, gamma=0.9)
        return advantages * 2 + returns

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*inputs), step(*inputs))


def test_direct_op_call_checks_arguments():
    inputs = make_inputs(2, 3, seed=14)
    with pytest.raises(RuntimeError, match="'kl_estimator'"):
        torch.ops.alignfast.compute_advantages(*_op_args(inputs, kl_estimator="k9"))
    with pytest.raises(RuntimeError, match="'gamma'"):
        torch.ops.alignfast.compute_advantages(*_op_args(inputs, gamma=1.5))


def _bad(**changes):
    return changes


BAD_INPUTS = [
    ("logprobs", _bad(logprobs=torch.zeros(2, 3, 4))),
    ("logprobs", _bad(logprobs=torch.zeros(2, 3, dtype=torch.int64))),
    ("ref_logprobs", _bad(ref_logprobs=torch.zeros(2, 4))),
    ("ref_logprobs", _bad(ref_logprobs=torch.zeros(2, 3, dtype=torch.float64))),
    ("values", _bad(values=torch.zeros(3, 3))),
    ("values", _bad(values=[[0.0] * 3] * 2)),
    ("scores", _bad(scores=torch.zeros(3))),
    ("scores", _bad(scores=torch.zeros(2, 1))),
    ("mask", _bad(mask=torch.ones(2, 4, dtype=torch.bool))),
    ("mask", _bad(mask=torch.ones(2, 3))),
    ("kl_coef", _bad(kl_coef=float("nan"))),
    ("kl_coef", _bad(kl_coef=float("inf"))),
    ("kl_coef", _bad(kl_coef=-0.1)),
    ("kl_estimator", _bad(kl_estimator="k4")),
    ("gamma", _bad(gamma=1.01)),
    ("gamma", _bad(gamma=-0.5)),
    ("gamma", _bad(gamma=float("nan"))),
    ("lam", _bad(lam=2.0)),
    ("lam", _bad(lam=float("-inf"))),
    ("whiten", _bad(whiten="yes")),
]


@pytest.mark.parametrize("name,changes", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(name, changes):
    logprobs, ref_logprobs, values, scores, mask = make_inputs(2, 3, seed=15)
    args = dict(logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, scores=scores, mask=mask, kl_coef=0.1,
                kl_estimator="k1", gamma=1.0, lam=0.95, whiten=True) | changes
    with pytest.raises(AlignfastArgumentError, match=f"'{name}'"):
        ops.compute_advantages(args.pop("logprobs"), args.pop("ref_logprobs"), args.pop("values"), args.pop("scores"),
                               args.pop("mask"), **args)


def test_device_mismatch_names_the_argument():
    logprobs, ref_logprobs, values, scores, mask = make_inputs(2, 3, seed=16)
    with pytest.raises(AlignfastArgumentError, match="'values' is on meta"):
        ops.compute_advantages(logprobs, ref_logprobs, values.to("meta"), scores, mask, kl_coef=0.1)


def test_empty_batch_or_sequence():
    for B, T in ((0, 5), (3, 0)):
        inputs = make_inputs(B, T, seed=17, mask=torch.ones(B, T, dtype=torch.bool))
        for name, out in zip(OUTPUTS, ops.compute_advantages(*inputs, kl_coef=0.1)):
            assert out.shape == (B, T) and out.dtype == torch.float32, name
