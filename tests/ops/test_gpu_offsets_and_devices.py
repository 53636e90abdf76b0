"""GPU-only checks the interpreter cannot make: the fast kernels are the ones running (not the reference
fallback, which would let every other gpu test pass against itself), 64-bit offsets into [N, V] logits
past 2^31 elements, and tensors on a GPU that is not the current device (Triton launches on the current
device unless told).

Skipped without CUDA; the multi-device test also needs two GPUs, the large test ~12 GiB free.
Tolerances as in tests/ops/test_token_logprobs.py (bf16 logits, float32 outputs, bf16 gradients).
"""

from __future__ import annotations

import pytest
import torch

import alignfast.ops as ops
from alignfast import _ext, reference
from alignfast.ops._library import OPS, describe, has_kernel
from tests.ops.test_advantages import OUTPUTS
from tests.ops.test_advantages import make_inputs as advantage_inputs
from tests.ops.test_ppo_loss import leaf
from tests.ops.test_ppo_loss import make_inputs as ppo_inputs
from tests.utils import assert_close, random_mask

pytestmark = pytest.mark.gpu

V = 151936
LP_TOL = dict(rtol=1e-5, atol=2e-5)
ENT_TOL = dict(rtol=1e-5, atol=5e-5)
BF16_GRAD_TOL = dict(rtol=1.6e-2, atol=1e-9)


def test_every_op_runs_its_gpu_kernel():
    """A CUDA build that failed or was skipped would send the ops to the reference with one warning."""
    assert _ext.cuda_compiled(), f"alignfast._C has no CUDA kernels: {_ext.reason()}"
    for name, info in OPS.items():
        assert has_kernel(name, "cuda"), name
        impl, why = describe(name, "cuda")
        assert impl == {"cuda": "CUDA C++", "triton": "Triton", "torch": "torch"}[info.gpu_impl], f"{name}: {impl} ({why})"


def _free_bytes() -> int:
    free, _total = torch.cuda.mem_get_info()
    return free


@pytest.mark.parametrize("layout", ["B,T,V", "N,V"])
def test_token_logprobs_past_2_31_elements(layout):
    """[2, 7500, 151936] bf16 holds 2.28e9 elements: the last rows start past 2^31, so any 32-bit offset
    (row * stride, or its sum over the B and T strides) reads or writes the wrong row."""
    B, T = 2, 7500
    assert B * T * V > 2**31
    if _free_bytes() < 12 * 2**30:
        pytest.skip("needs ~12 GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.empty(B, T, V, dtype=torch.bfloat16, device="cuda").normal_(0, 3, generator=gen)
    tokens = torch.randint(0, V, (B, T), device="cuda", generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    mask[1, -2] = False  # a masked row past 2^31: output 0, gradient 0
    x = logits.view(B * T, V) if layout == "N,V" else logits
    tok, m = (tokens.view(-1), mask.view(-1)) if layout == "N,V" else (tokens, mask)
    x = x.detach().requires_grad_()
    lp, ent = ops.token_logprobs(x, tok, mask=m, temperature=0.7, return_entropy=True)
    g_lp = torch.randn(lp.shape, device="cuda", generator=gen)
    g_ent = torch.randn(lp.shape, device="cuda", generator=gen)
    (lp * g_lp + ent * g_ent).sum().backward()
    grad = x.grad.view(B * T, V)
    flat = [0, T - 1, T, B * T - 3, B * T - 2, B * T - 1]  # both batch rows' edges and the very last rows
    assert flat[-1] * V > 2**31
    rows = torch.tensor(flat, device="cuda")
    sub = logits.view(B * T, V)[rows].double().cpu().requires_grad_()
    r_lp, r_ent = reference.token_logprobs(sub, tokens.view(-1)[rows].cpu(), temperature=0.7,
                                           mask=mask.view(-1)[rows].cpu(), return_entropy=True)
    (r_lp * g_lp.reshape(-1)[rows].double().cpu() + r_ent * g_ent.reshape(-1)[rows].double().cpu()).sum().backward()
    assert_close(lp.reshape(-1)[rows], r_lp, name="logprobs", **LP_TOL)
    assert_close(ent.reshape(-1)[rows], r_ent, name="entropy", **ENT_TOL)
    assert_close(grad[rows], sub.grad, name="dlogits", **BF16_GRAD_TOL)


def _every_op(dev: str) -> dict[str, torch.Tensor]:
    """Outputs and gradients of every op on device `dev`, on fixed inputs, moved to the CPU."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 1000, generator=g).to(torch.bfloat16).to(dev).requires_grad_()
    tokens = torch.randint(0, 1000, (3, 5), generator=g).to(dev)
    mask = random_mask(3, 5, generator=g).to(dev)
    hidden = torch.randn(15, 64, generator=g).to(dev).requires_grad_()
    weight = (torch.randn(1000, 64, generator=g) / 8).to(dev).requires_grad_()
    lp, ent = ops.token_logprobs(logits, tokens, mask=mask, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    llp = ops.linear_token_logprobs(hidden, weight, tokens.reshape(-1), mask=mask.reshape(-1))
    llp.sum().backward()
    adv = ops.compute_advantages(*[t.to(dev) for t in advantage_inputs(4, 300, seed=1)], kl_coef=0.1)
    tensors, ppo_mask = ppo_inputs(4, 300, seed=2, device=dev)
    tensors = leaf(tensors)
    loss, _ = ops.ppo_loss(*tensors, ppo_mask)
    loss.backward()
    out = {"logprobs": lp, "entropy": ent, "dlogits": logits.grad, "linear logprobs": llp, "dhidden": hidden.grad,
           "dweight": weight.grad, **dict(zip(OUTPUTS, adv)), "ppo loss": loss, "ppo dlogprobs": tensors[0].grad,
           "ppo dvalues": tensors[3].grad}
    return {k: v.detach().cpu() for k, v in out.items()}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_on_a_gpu_that_is_not_current():
    """Every op on cuda:1 while cuda:0 is current gives what it gives on cuda:0 (same kernels, same inputs)."""
    assert torch.cuda.current_device() == 0
    on0, on1 = _every_op("cuda:0"), _every_op("cuda:1")
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    for name in on0:
        torch.testing.assert_close(on1[name], on0[name], rtol=1e-6, atol=1e-7, msg=name)
