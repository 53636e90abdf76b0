"""Triton kernels of token_logprobs (kernels/logprobs.py) under TRITON_INTERPRET=1 on CPU tensors.

The interpreter runs every program in Python: sizes stay tiny (the whole file takes a few seconds).
Tolerances as in tests/ops/test_token_logprobs.py; float64 is computed in float64 throughout (the
kernels take 1/temperature as a float64 argument; as a plain Python float Triton would pass it as
float32 on the GPU, ~4e-7 relative error in dlogits), so it is held to rounding.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from alignfast import reference
from tests.utils import assert_close, random_mask

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                       reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU"),
]

GRAD_TOL = {
    torch.float32: dict(rtol=1e-4, atol=2e-7),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-9),
    torch.float16: dict(rtol=2e-3, atol=1e-7),
    torch.float64: dict(rtol=1e-10, atol=1e-14),
}
OUT_TOL = {"logprobs": dict(rtol=1e-5, atol=2e-5), "entropy": dict(rtol=1e-5, atol=5e-5)}
OUT_TOL64 = dict(rtol=1e-12, atol=1e-12)


def _kernels():
    pytest.importorskip("triton")
    from alignfast.kernels import logprobs

    return logprobs


def _device():
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.parametrize("dtype,V,with_mask,temperature", [
    (torch.float32, 1, False, 1.0),
    (torch.float32, 300, True, 0.7),
    (torch.bfloat16, 7, True, 1.5),
    (torch.float16, 129, False, 1.0),
    (torch.float64, 50, True, 0.7),
])
def test_forward_backward_match_reference(dtype, V, with_mask, temperature):
    K = _kernels()
    dev = _device()
    B, T = 2, 5
    logits = (torch.randn(B, T, V) * 3).to(dtype)
    tokens = torch.randint(0, V, (B, T))
    logits[0, 0, tokens[0, 0]] = 30.0  # a very confident row
    if V > 2:
        logits[1, 1, : V // 2] = float("-inf")
        tokens[1, 1] = V - 1
        logits[1, 2, tokens[1, 2]] = float("-inf")  # a -inf target
    mask = random_mask(B, T) if with_mask else None
    if mask is not None:
        mask[0, 0] = mask[1, 1] = mask[1, 2] = True
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    g_lp, g_ent = torch.randn(B, T, dtype=stats), torch.randn(B, T, dtype=stats)

    x = logits.double().requires_grad_()
    r_lp, r_ent = reference.token_logprobs(x, tokens, temperature=temperature, mask=mask, return_entropy=True)
    (r_lp * g_lp + r_ent * g_ent).sum().backward()

    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy evaluates both sides of tl.where
        lp, ent, lse = K.token_logprobs_cuda(to(logits), to(tokens), to(mask), temperature, True)
        grad = K.token_logprobs_backward_cuda(to(g_lp), to(g_ent), to(logits), to(tokens), to(mask), lp, ent, lse,
                                              temperature)
    assert lp.dtype == stats and grad.dtype == dtype
    out_tol = lambda name: OUT_TOL64 if dtype == torch.float64 else OUT_TOL[name]  # noqa: E731
    assert_close(lp, r_lp, name="logprobs", **out_tol("logprobs"))
    assert_close(ent, r_ent, name="entropy", **out_tol("entropy"))
    assert_close(grad, x.grad, name="dlogits", **GRAD_TOL[dtype])


def test_strided_rows_and_no_entropy():
    K = _kernels()
    dev = _device()
    full = torch.randn(2, 4, 40)
    logits = full[:, :-1, :33]  # B/T strides of the parent, unit stride over V
    tokens = torch.randint(0, 33, (2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lp, ent, lse = K.token_logprobs_cuda(logits.to(dev), tokens.to(dev), None, 1.0, False)
        g = torch.ones(2, 3)
        grad = K.token_logprobs_backward_cuda(g.to(dev), None, logits.to(dev), tokens.to(dev), None, lp, ent, lse, 1.0)
    assert ent.numel() == 0
    x = logits.double().requires_grad_()
    r = reference.token_logprobs(x, tokens)
    r.sum().backward()
    assert_close(lp, r, rtol=1e-5, atol=2e-5)
    assert_close(grad, x.grad, **GRAD_TOL[torch.float32])


def test_non_contiguous_row_tensors():
    """Direct op calls may hand the launchers transposed [B, T] tokens, mask and upstream gradients; the
    kernels index them as flat rows, so the launchers must not read them through their strides."""
    K = _kernels()
    dev = _device()
    B, T, V = 3, 4, 33
    logits = torch.randn(B, T, V) * 2
    tokens = torch.randint(0, V, (T, B)).t()
    mask = random_mask(T, B).t()
    mask[0, 0] = True
    g_lp, g_ent = torch.randn(T, B).t(), torch.randn(T, B).t()
    assert not (tokens.is_contiguous() or mask.is_contiguous() or g_lp.is_contiguous())
    x = logits.double().requires_grad_()
    r_lp, r_ent = reference.token_logprobs(x, tokens, mask=mask, return_entropy=True)
    (r_lp * g_lp + r_ent * g_ent).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lp, ent, lse = K.token_logprobs_cuda(logits.to(dev), tokens.to(dev), mask.to(dev), 1.0, True)
        grad = K.token_logprobs_backward_cuda(g_lp.to(dev), g_ent.to(dev), logits.to(dev), tokens.to(dev),
                                              mask.to(dev), lp.t().contiguous().t(), ent, lse, 1.0)
    assert_close(lp, r_lp, name="logprobs", rtol=1e-5, atol=2e-5)
    assert_close(ent, r_ent, name="entropy", rtol=1e-5, atol=5e-5)
    assert_close(grad, x.grad, name="dlogits", **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_online_rescaling_across_tiles(dtype, monkeypatch):
    """The forward's running max/sum/entropy rescaling across vocabulary tiles (only V > 4096 reaches it
    with the real block size): 16-wide tiles here, with whole tiles of -inf before and after finite ones,
    a row whose max arrives in the last tile, and a very confident row."""
    K = _kernels()
    dev = _device()
    monkeypatch.setattr(K, "FORWARD_BLOCK", 16)
    monkeypatch.setattr(K, "BACKWARD_BLOCK", 16)
    B, T, V = 2, 4, 100
    logits = (torch.randn(B, T, V) * 3).to(dtype)
    tokens = torch.randint(0, V, (B, T))
    logits[0, 0, :48] = float("-inf")  # three whole -inf tiles first
    tokens[0, 0] = 60
    logits[0, 1, 80:] = float("-inf")  # -inf tiles last
    tokens[0, 1] = 3
    logits[0, 2, 99] = 25.0  # the max in the last (partial) tile
    logits[1, 0, tokens[1, 0]] = 30.0  # confident
    g_lp, g_ent = torch.randn(B, T), torch.randn(B, T)
    x = logits.double().requires_grad_()
    r_lp, r_ent = reference.token_logprobs(x, tokens, temperature=0.7, return_entropy=True)
    (r_lp * g_lp + r_ent * g_ent).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lp, ent, lse = K.token_logprobs_cuda(logits.to(dev), tokens.to(dev), None, 0.7, True)
        grad = K.token_logprobs_backward_cuda(g_lp.to(dev), g_ent.to(dev), logits.to(dev), tokens.to(dev), None,
                                              lp, ent, lse, 0.7)
    assert_close(lp, r_lp, name="logprobs", **OUT_TOL["logprobs"])
    assert_close(ent, r_ent, name="entropy", **OUT_TOL["entropy"])
    assert_close(grad, x.grad, name="dlogits", **GRAD_TOL[dtype])
