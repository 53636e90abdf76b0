"""propose_token (the fused propose step of Proxy-RLHF) against its spec alignfast.reference.propose_token.

What must hold:
  * distribution: the sampled tokens follow the target's temperature-scaled distribution restricted to
    its nucleus minus the excluded tokens (chi-square against the float64 spec, p > 1e-4);
  * the same uniforms give the same tokens in the reference, the C++ kernel and the Triton kernel
    (interpreter, small shapes), and the same num_allowed; log-probs agree to 1e-5 relative in float32
    (1e-10 in float64);
  * edges: everything excluded but one token, -inf logits, an all -inf row, V = 151936, greedy;
  * opcheck on the schema; bad input names the argument.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from alignfast import ops, reference
from alignfast.ops._library import force_backend, has_kernel
from tests.utils import assert_close

needs_cpp = pytest.mark.skipif(not has_kernel("propose_token", "cpu"), reason="alignfast._C not built")


def make(B, V, *, seed=0, dtype=torch.float32, scale=2.0, p_excl=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    excluded = torch.rand(B, V, generator=g) < p_excl
    uniforms = torch.rand(B, generator=g, dtype=torch.float64)
    return logits, excluded, uniforms.to(torch.float64 if dtype == torch.float64 else torch.float32)


def expected_distribution(logits, excluded, temperature, top_p):
    """The spec's sampling distribution for one row, in float64."""
    allowed = reference.proposal.nucleus(logits[None].double(), temperature=temperature, top_p=top_p)[0] & ~excluded
    z = logits.double() / temperature
    p = torch.where(allowed, torch.exp(z - z[allowed].max()), torch.zeros_like(z))
    return p / p.sum()


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    n = counts.sum()
    exp = probs[keep] * n
    stat = ((counts[keep] - exp) ** 2 / exp).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2.0))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8), (1.5, 0.95)])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_chi_square_against_the_spec(temperature, top_p, backend):
    V, N = 24, 20000
    logits, excluded, _ = make(1, V, seed=3)
    excluded[0, logits[0].argmax()] = True  # the most likely token was rejected: renormalised re-proposal
    uniforms = torch.rand(N, generator=torch.Generator().manual_seed(9))
    with force_backend(backend):
        tokens, logprobs, n = ops.propose_token(logits.expand(N, V), excluded.expand(N, V), uniforms,
                                                temperature=temperature, top_p=top_p)
    probs = expected_distribution(logits[0], excluded[0], temperature, top_p)
    assert bool((probs[tokens] > 0).all()), "sampled a token outside the allowed set"
    counts = torch.bincount(tokens, minlength=V).double()
    assert chi_square_pvalue(counts, probs) > 1e-4
    # the returned log-prob is the log of the renormalised probability of the token
    assert_close(logprobs, probs[tokens].log(), rtol=1e-5, atol=1e-5, name="logprobs")
    assert bool((n == int((probs > 0).sum())).all())


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 0.9), (0.0, 0.7), (2.0, 0.5)])
def test_cpp_matches_reference(dtype, temperature, top_p):
    logits, excluded, uniforms = make(64, 1000, seed=5, dtype=dtype)
    tok, lp, n = ops.propose_token(logits, excluded, uniforms, temperature=temperature, top_p=top_p)
    rtok, rlp, rn = reference.propose_token(logits.double() if dtype != torch.float32 else logits, excluded,
                                            uniforms, temperature=temperature, top_p=top_p)
    assert torch.equal(n, rn)
    assert torch.equal(tok, rtok)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(lp, rlp, rtol=tol, atol=tol, name="logprobs")
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@needs_cpp
def test_everything_excluded_but_one():
    logits, _, uniforms = make(5, 300, seed=7)
    keep = torch.tensor([0, 17, 299, 150, 3])
    excluded = torch.ones(5, 300, dtype=torch.bool)
    excluded[torch.arange(5), keep] = False
    for backend in ("auto", "reference"):
        with force_backend(backend):
            tok, lp, n = ops.propose_token(logits, excluded, uniforms, temperature=0.9)
        assert torch.equal(tok, keep) and torch.equal(n, torch.ones(5, dtype=torch.long))
        assert_close(lp, torch.zeros(5), rtol=0, atol=1e-6, name="logprobs")
        # nothing left at all: token -1, log-prob -inf
        with force_backend(backend):
            tok, lp, n = ops.propose_token(logits, torch.ones_like(excluded), uniforms, temperature=0.9)
        assert bool((tok == -1).all()) and bool(torch.isneginf(lp).all()) and bool((n == 0).all())


@needs_cpp
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9), (0.0, 1.0)])
def test_minus_infinity_logits(temperature, top_p):
    logits, excluded, uniforms = make(6, 200, seed=8)
    logits[:, ::3] = float("-inf")
    logits[2] = float("-inf")  # a row with no finite logit
    logits[4] = float("-inf")
    logits[4, 1] = 0.5  # a single finite logit
    excluded[4] = False
    outs = []
    for backend in ("auto", "reference"):
        with force_backend(backend):
            outs.append(ops.propose_token(logits, excluded, uniforms, temperature=temperature, top_p=top_p))
    (tok, lp, n), (rtok, rlp, rn) = outs
    assert torch.equal(tok, rtok) and torch.equal(n, rn)
    assert_close(lp, rlp, rtol=1e-5, atol=1e-5, name="logprobs")
    assert tok[2] == -1 and n[2] == 0 and torch.isneginf(lp[2])
    assert tok[4] == 1 and n[4] == 1
    ok = tok >= 0
    assert bool(torch.isfinite(logits[ok, tok[ok]]).all()), "proposed a -inf logit"


@needs_cpp
def test_qwen_vocabulary():
    logits, excluded, uniforms = make(3, 151936, seed=10, scale=3.0, p_excl=0.01)
    for temperature, top_p in ((1.0, 0.9), (0.7, 1.0)):
        tok, lp, n = ops.propose_token(logits, excluded, uniforms, temperature=temperature, top_p=top_p)
        rtok, rlp, rn = reference.propose_token(logits.double(), excluded, uniforms, temperature=temperature,
                                                top_p=top_p)
        assert torch.equal(tok, rtok) and torch.equal(n, rn)
        assert_close(lp, rlp, rtol=1e-4, atol=1e-4, name="logprobs")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    logits, excluded, uniforms = make(4, 33, seed=11, dtype=dtype)
    torch.library.opcheck(torch.ops.alignfast.propose_token.default, (logits, excluded, uniforms, 0.8, 0.9))


def test_bad_input_names_the_argument():
    logits, excluded, uniforms = make(2, 10)
    with pytest.raises(ValueError, match="'excluded'"):
        ops.propose_token(logits, excluded.float(), uniforms, temperature=1.0)
    with pytest.raises(ValueError, match="'uniforms'"):
        ops.propose_token(logits, excluded, uniforms[:1], temperature=1.0)
    with pytest.raises(ValueError, match="'top_p'"):
        ops.propose_token(logits, excluded, uniforms, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="'temperature'"):
        ops.propose_token(logits, excluded, uniforms, temperature=-1.0)
    with pytest.raises(ValueError, match="'logits'"):
        ops.propose_token(logits[0], excluded[0], uniforms, temperature=1.0)


@pytest.mark.interpret
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU")
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.85), (0.0, 0.9)])
def test_triton_matches_reference_and_cpp(temperature, top_p, monkeypatch):
    pytest.importorskip("triton")
    from alignfast.kernels import proposal as K

    monkeypatch.setattr(K, "BLOCK_MAX", 64)  # several tiles per row at an interpreter-sized vocabulary
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    logits, excluded, uniforms = make(6, 150, seed=12)
    logits[1, :40] = float("-inf")
    excluded[2] = True
    excluded[2, 77] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy evaluates both sides of tl.where
        tok, lp, n = K.propose_token_triton(logits.to(dev), excluded.to(dev), uniforms.to(dev), temperature, top_p)
    rtok, rlp, rn = reference.propose_token(logits, excluded, uniforms, temperature=temperature, top_p=top_p)
    assert torch.equal(tok.cpu(), rtok) and torch.equal(n.cpu(), rn)
    assert_close(lp.cpu(), rlp, rtol=1e-5, atol=1e-5, name="logprobs")
    if has_kernel("propose_token", "cpu"):
        ctok, _, cn = ops.propose_token(logits, excluded, uniforms, temperature=temperature, top_p=top_p)
        assert torch.equal(ctok, rtok) and torch.equal(cn, rn)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_cuda_op_at_a_real_vocabulary_matches_the_cpu_op(dtype, temperature, top_p):
    """ops.propose_token on CUDA (the Triton kernel with its real 4096-wide tile, or float64's path) against the
    C++ op on the same rows: the same tokens and nucleus sizes, log-probs to float32 rounding. V = 151936, with
    -inf logits and excluded tokens, and one row whose every token is excluded (token -1)."""
    if not has_kernel("propose_token", "cpu"):
        pytest.skip("alignfast._C has no CPU kernel (extension not built)")
    logits, excluded, uniforms = make(8, 151936, seed=31, dtype=dtype)
    logits[1, :100000] = float("-inf")
    excluded[3] = True
    tok, lp, n = ops.propose_token(logits.cuda(), excluded.cuda(), uniforms.cuda(), temperature=temperature,
                                   top_p=top_p)
    ctok, clp, cn = ops.propose_token(logits, excluded, uniforms, temperature=temperature, top_p=top_p)
    assert tok.is_cuda and torch.equal(tok.cpu(), ctok) and torch.equal(n.cpu(), cn)
    assert int(ctok[3]) == -1
    assert_close(lp.cpu(), clp, rtol=1e-5, atol=1e-5, name="logprobs")


SIGNED_ZEROS = [  # (logits row, uniform, top_p): -0 and +0 are the same value, tied in the nucleus and the draw
    ([1.0, 0.0, -0.0], 0.99, 1.0),
    ([0.0, -0.0, -5.0], 0.9, 0.3),
]


@needs_cpp
@pytest.mark.parametrize("row,u,top_p", SIGNED_ZEROS)
def test_a_negative_zero_logit_is_a_zero(row, u, top_p):
    """The kernels keyed -0.0 one step below +0.0 (its bits), where the spec compares values: with [1, 0, -0] the
    -0 token was never drawn (num_allowed 2 of 3), even at the default top_p."""
    logits = torch.tensor([row])
    got = ops.propose_token(logits, torch.zeros_like(logits, dtype=torch.bool), torch.tensor([u]), temperature=1.0,
                            top_p=top_p)
    want = reference.propose_token(logits.double(), torch.zeros_like(logits, dtype=torch.bool),
                                   torch.tensor([u], dtype=torch.float64), temperature=1.0, top_p=top_p)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert_close(got[1], want[1], rtol=1e-6, atol=1e-6, name="logprobs")


@needs_cpp
def test_float64_logits_are_sampled_with_the_float64_uniform():
    """The CPU op rounded every uniform to float32: u = 1 - 1e-12 became 1.0 and drew the last token, not the
    first (whose probability is 1 - 9e-14), where the spec (and the GPU path, which sends float64 to it) keep it."""
    logits = torch.tensor([[0.0, -30.0]], dtype=torch.float64)
    u = torch.tensor([1 - 1e-12], dtype=torch.float64)
    tok, lp, _ = ops.propose_token(logits, torch.zeros_like(logits, dtype=torch.bool), u, temperature=1.0)
    rtok, rlp, _ = reference.propose_token(logits, torch.zeros_like(logits, dtype=torch.bool), u, temperature=1.0)
    assert tok.tolist() == rtok.tolist() == [0] and float(lp) == pytest.approx(float(rlp), abs=1e-15)


@pytest.mark.interpret
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU")
@pytest.mark.parametrize("row,u,top_p", SIGNED_ZEROS)
def test_triton_keys_a_negative_zero_as_a_zero(row, u, top_p):
    pytest.importorskip("triton")
    from alignfast.kernels import proposal as K

    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    logits = torch.tensor([row])
    excluded = torch.zeros_like(logits, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy evaluates both sides of tl.where
        tok, _, n = K.propose_token_triton(logits.to(dev), excluded.to(dev), torch.tensor([u]).to(dev), 1.0, top_p)
    rtok, _, rn = reference.propose_token(logits.double(), excluded, torch.tensor([u], dtype=torch.float64),
                                          temperature=1.0, top_p=top_p)
    assert torch.equal(tok.cpu(), rtok) and torch.equal(n.cpu(), rn)
