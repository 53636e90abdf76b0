"""The CUDA kernels of compute_advantages and ppo_loss (csrc/cuda) against the float64 reference.

Skipped without a CUDA device. On a GPU machine: `python -m pytest tests/ops/test_seqops_cuda.py -m gpu`.
Shapes cover the kernel's paths: T a multiple of 8 with aligned rows (16-byte loads) and not (scalar
loads), a storage offset (misaligned base), one tile (T <= 2048 tokens) and several (T = 2049, 4096,
5000), a block narrower than a warp's worth of tokens (T < 8), and B > the number of SMs.
Tolerances as on CPU: float64 to rounding, float32 (and half inputs, computed in float32) 1e-5/1e-4.
"""

from __future__ import annotations

import pytest
import torch

import alignfast.ops as ops
from alignfast import reference
from tests.ops.test_advantages import OUTPUTS, _op_args, check_against_reference
from tests.ops.test_advantages import make_inputs as advantage_inputs
from tests.ops.test_ppo_loss import TOL32, TOL64
from tests.ops.test_ppo_loss import check_against_reference as check_ppo
from tests.ops.test_ppo_loss import leaf
from tests.ops.test_ppo_loss import _op_args as ppo_op_args
from tests.ops.test_ppo_loss import make_inputs as ppo_inputs

pytestmark = pytest.mark.gpu
CUDA = "cuda"

SHAPES = [(1, 1), (3, 5), (4, 8), (7, 64), (5, 257), (2, 2048), (3, 2049), (9, 4096), (2, 5000), (300, 24)]


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_advantages_cuda_shapes(B, T, dtype):
    inputs = advantage_inputs(B, T, dtype=dtype, seed=B + T, device=CUDA)
    check_against_reference(inputs, tol_dtype=dtype, kl_coef=0.05, kl_estimator="k3", gamma=0.99, lam=0.95)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("gamma,lam", [(0.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.9, 0.95)])
def test_advantages_cuda_estimators_and_coefficients(kl_estimator, whiten, gamma, lam):
    inputs = advantage_inputs(6, 3000, dtype=torch.float64, seed=7, device=CUDA)
    check_against_reference(inputs, tol_dtype=torch.float64, kl_coef=0.1, kl_estimator=kl_estimator, gamma=gamma,
                            lam=lam, whiten=whiten)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [64, 4096, 99])
def test_advantages_cuda_half_inputs(dtype, T):
    inputs = advantage_inputs(5, T, dtype=dtype, seed=T, device=CUDA)
    check_against_reference(inputs, tol_dtype=torch.float32, kl_coef=0.1)


def test_advantages_cuda_misaligned_and_non_contiguous():
    logprobs, ref_logprobs, values, scores, mask = advantage_inputs(6, 128, dtype=torch.float64, seed=8, device=CUDA)
    # A contiguous view one element into its storage: T % 8 == 0 but the base is not 16-byte aligned.
    offset = lambda t: torch.cat([t.flatten()[:1], t.flatten()])[1:].view(t.shape)  # noqa: E731
    shifted = [offset(t) for t in (logprobs, ref_logprobs, values, mask)]
    assert shifted[0].storage_offset() > 0 and shifted[0].is_contiguous()
    check_against_reference((shifted[0], shifted[1], shifted[2], scores, shifted[3]), tol_dtype=torch.float64,
                            kl_coef=0.1)
    t = lambda x: x.t().contiguous().t()  # noqa: E731
    check_against_reference((t(logprobs), t(ref_logprobs), t(values), scores, t(mask)), tol_dtype=torch.float64,
                            kl_coef=0.1)


def test_advantages_cuda_garbage_at_masked_positions_and_deterministic():
    logprobs, ref_logprobs, values, scores, mask = advantage_inputs(64, 2500, seed=9, device=CUDA)
    clean = ops.compute_advantages(logprobs, ref_logprobs, values, scores, mask, kl_coef=0.1, kl_estimator="k3")
    again = ops.compute_advantages(logprobs, ref_logprobs, values, scores, mask, kl_coef=0.1, kl_estimator="k3")
    dirty = [t.clone() for t in (logprobs, ref_logprobs, values)]
    for x, bad in zip(dirty, (float("nan"), float("inf"), float("-inf"))):
        x[~mask] = bad
    out = ops.compute_advantages(*dirty, scores, mask, kl_coef=0.1, kl_estimator="k3")
    for name, a, b, c in zip(OUTPUTS, out, clean, again):
        assert torch.equal(a, b) and torch.equal(b, c), name


def test_advantages_cuda_matches_cpu_kernel():
    inputs = advantage_inputs(32, 1000, dtype=torch.float64, seed=10)
    cpu = ops.compute_advantages(*inputs, kl_coef=0.1)
    gpu = ops.compute_advantages(*[t.to(CUDA) for t in inputs], kl_coef=0.1)
    for name, a, b in zip(OUTPUTS, gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-11, atol=1e-11, msg=name)


def test_advantages_cuda_opcheck_and_graph_capture():
    inputs = advantage_inputs(5, 40, seed=11, device=CUDA)
    torch.library.opcheck(torch.ops.alignfast.compute_advantages.default, _op_args(inputs))
    eager = ops.compute_advantages(*inputs, kl_coef=0.1)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.compute_advantages(*inputs, kl_coef=0.1)  # warm up outside the capture
        with torch.cuda.graph(graph):
            captured = ops.compute_advantages(*inputs, kl_coef=0.1)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(OUTPUTS, captured, eager):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (16, 1000), (256, 4096), (3, 100003)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ppo_loss_cuda(B, T, dtype):
    if B * T > 2**20 and dtype == torch.float64:
        pytest.skip("the float64 case is covered at smaller sizes")
    tensors, mask = ppo_inputs(B, T, dtype=dtype, seed=B + T, device=CUDA)
    check_ppo(tensors, mask, tol=TOL64 if dtype == torch.float64 else TOL32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ppo_loss_cuda_half_inputs(dtype):
    tensors, mask = ppo_inputs(8, 300, dtype=dtype, seed=12, device=CUDA)
    check_ppo(tensors, mask, tol=TOL32, grad_tol=dict(rtol=2**-7, atol=1e-6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ppo_loss_cuda_half_gradients_are_the_float_product_rounded_once(dtype):
    """n = 2400 valid tokens: bf16(1/2400) is 0.2% off 1/2400, so a scale rounded to the gradients' dtype before
    the multiply (a 0-d float32 CUDA tensor times bf16 does that) shows as a systematic error; the CPU kernel
    rounds once."""
    from alignfast.ops.ppo_loss import NUM_VALID

    tensors, mask = ppo_inputs(8, 300, dtype=dtype, seed=12, device=CUDA)
    mask = torch.ones_like(mask)
    _, stats, g_lp, g_v = torch.ops.alignfast.ppo_loss(*ppo_op_args(tensors, mask, True))
    assert stats[NUM_VALID].item() == 2400
    grad_loss = torch.tensor(1.0, dtype=stats.dtype, device=CUDA)
    got_lp, got_v = torch.ops.alignfast.ppo_loss_backward(grad_loss, stats, g_lp, g_v, True, True)
    for got, g in ((got_lp, g_lp), (got_v, g_v)):
        want = (g.float() * (grad_loss / 2400)).to(dtype)
        assert torch.equal(got, want)


def test_ppo_loss_cuda_matches_cpu_and_is_deterministic():
    tensors, mask = ppo_inputs(64, 777, dtype=torch.float64, seed=13)
    cpu = leaf(tensors)
    loss_cpu, _ = ops.ppo_loss(*cpu, mask)
    loss_cpu.backward()
    results = []
    for _ in range(2):
        gpu = leaf([t.to(CUDA) for t in tensors])
        loss, stats = ops.ppo_loss(*gpu, mask.to(CUDA))
        loss.backward()
        results.append((loss.detach(), gpu[0].grad, gpu[3].grad, torch.stack(list(stats.values()))))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    torch.testing.assert_close(results[0][0].cpu(), loss_cpu.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1].cpu(), cpu[0].grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results[0][2].cpu(), cpu[3].grad, rtol=1e-12, atol=1e-14)


def test_ppo_loss_cuda_opcheck_and_no_valid_token():
    tensors, mask = ppo_inputs(4, 33, seed=14, device=CUDA)
    torch.library.opcheck(torch.ops.alignfast.ppo_loss.default, (*leaf(tensors), mask, 0.2, 0.2, 0.1, True))
    torch.library.opcheck(torch.ops.alignfast.ppo_loss.default, (*tensors, mask, 0.2, 0.2, 0.1, False))
    tensors = leaf(tensors)
    loss, stats = ops.ppo_loss(*tensors, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0 and all(v.item() == 0 for v in stats.values())
    assert not tensors[0].grad.any() and not tensors[3].grad.any()


def test_reference_is_what_cuda_is_tested_against():
    """Guards the test inputs: the reference itself runs on CUDA tensors and agrees with its CPU run."""
    inputs = advantage_inputs(4, 50, dtype=torch.float64, seed=15)
    cpu = reference.compute_advantages(*inputs, kl_coef=0.1)
    gpu = reference.compute_advantages(*[t.to(CUDA) for t in inputs], kl_coef=0.1)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12)
