"""kernels/linear_logprobs.py (the CUDA implementation of linear_token_logprobs: GEMM chunks + the
Triton log-prob kernels) under TRITON_INTERPRET=1 on CPU tensors, at tiny sizes.

Tolerances: outputs as in tests/ops/test_linear_token_logprobs.py. Gradients: float32 norm-wise 1e-5;
bf16 norm-wise 1e-2, because this path rounds dz to the weight's dtype before the gradient GEMMs
(tensor cores on the GPU) and rounds the result once more.
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


@pytest.mark.parametrize("dtype,with_mask,need", [
    (torch.float32, True, (True, True, True)),
    (torch.bfloat16, False, (True, True, True)),
    (torch.float32, False, (True, False, False)),
])
def test_linear_matches_reference(dtype, with_mask, need):
    pytest.importorskip("triton")
    from alignfast.kernels import linear_logprobs as K

    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    N, H, V = 11, 8, 40
    hidden = torch.randn(N, H).to(dtype)
    weight = (torch.randn(V, H) * 0.5).to(dtype)
    bias = torch.randn(V).to(dtype)
    tokens = torch.randint(0, V, (N,))
    mask = random_mask(1, N)[0] if with_mask else None
    g_lp, g_ent = torch.randn(N), torch.randn(N)
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy evaluates both sides of tl.where
        lp, ent, lse = K.linear_token_logprobs_cuda(to(hidden), to(weight), to(bias), to(tokens), to(mask), 0.7, True, 4)
        dh, dw, db = K.linear_token_logprobs_backward_cuda(to(g_lp), to(g_ent), to(hidden), to(weight), to(bias),
                                                           to(tokens), to(mask), lp, ent, lse, 0.7, 4, *need)
    refs = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    r_lp, r_ent = reference.linear_token_logprobs(refs[0], refs[1], tokens, bias=refs[2], temperature=0.7, mask=mask,
                                                  return_entropy=True)
    (r_lp * g_lp.double() + r_ent * g_ent.double()).sum().backward()
    assert_close(lp, r_lp, name="logprobs", rtol=1e-5, atol=2e-5)
    assert_close(ent, r_ent, name="entropy", rtol=1e-5, atol=5e-5)
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    for name, got, ref, want in zip(("dhidden", "dweight", "dbias"), (dh, dw, db), refs, need):
        if not want:
            assert got.numel() == 0
            continue
        assert got.dtype == dtype
        assert_close(got, ref.grad, name=name, rtol=1.0, atol=float("inf"), rel=rel)


def test_backward_writes_the_weight_gradient_into_the_out_buffer():
    """The schema's weight_grad_out (ops/weight_grad_buffer.py): dW lands in the buffer, bit for bit the returned
    one's, and the op returns an empty dW."""
    pytest.importorskip("triton")
    from alignfast.kernels import linear_logprobs as K

    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    N, H, V = 9, 8, 30
    hidden, weight, tokens = torch.randn(N, H, device=dev), torch.randn(V, H, device=dev), torch.randint(0, V, (N,))
    tokens = tokens.to(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lp, ent, lse = K.linear_token_logprobs_cuda(hidden, weight, None, tokens, None, 1.0, False, 4)
        g = torch.randn(N, device=dev)
        _, fresh, _ = K.linear_token_logprobs_backward_cuda(g, None, hidden, weight, None, tokens, None, lp, ent, lse,
                                                            1.0, 4, True, True, False)
        out = torch.full((V, H), 7.0, device=dev)
        _, dw, _ = K.linear_token_logprobs_backward_cuda(g, None, hidden, weight, None, tokens, None, lp, ent, lse,
                                                         1.0, 4, True, True, False, out)
    assert dw.numel() == 0 and torch.equal(out, fresh)
