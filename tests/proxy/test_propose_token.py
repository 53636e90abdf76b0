"""propose_token (the fused propose step of Proxy-RLHF) against its spec alignfast.reference.propose_token.

What must hold:
  * distribution: the sampled tokens follow the target's temperature-scaled distribution restricted to
    its nucleus minus the excluded tokens (chi-square against the float64 spec, p > 1e-4);
  * the same uniforms give the same tokens in the reference, the C++ kernel and the Triton kernel
    (interpreter, small shapes), and the same num_allowed; log-probs agree to 1e-5 relative in float32
    (1e-10 in float64);
  * edges: everything excluded but one token, -inf logits, an all -inf row, V = 151936, greedy;
  * non-finite logits: a NaN row, or a +inf row at T > 0, is (-1, NaN, 0) in all three implementations; at T = 0
    a +inf logit is the greedy maximum; the normal rows of the batch are unchanged;
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


# --- non-finite logits: a NaN logit, or a +inf one at T > 0, leaves a row without a distribution ------------------

NAN, INF = float("nan"), float("inf")
NONFINITE_V = [45, 70]  # neither a multiple of 16 nor of 32: the last tile of a row is partial


def nonfinite_batch(V, dtype, seed=40):
    """Rows of NaN / +inf / -inf mixes at the first, a middle and the last index, among normal rows (0 and 13).
    Returns (logits, excluded, uniforms, kinds): kinds[b] is "normal", "nan" (any NaN) or "inf" (+inf, no NaN)."""
    logits, excluded, uniforms = make(14, V, seed=seed, dtype=torch.float64, p_excl=0.25)
    mid, last = V // 2, V - 1
    rows = {
        1: {0: NAN},
        2: {last: NAN},
        3: {mid: NAN, 2: -INF, last: -INF},
        4: {mid: INF},
        5: {last: INF},
        6: {3: INF, last - 1: INF},  # two +inf: greedy takes the first allowed one
        7: {0: INF, mid: NAN},  # both: NaN decides
        8: {0: -INF, 1: -INF, mid: INF, last: -INF},
        9: {0: INF},  # its only +inf token excluded below
        10: {2: INF, 5: INF},  # every +inf token excluded below
        11: {mid: NAN},  # the NaN token excluded below: still no distribution
    }
    for b, entries in rows.items():
        for v, value in entries.items():
            logits[b, v] = value
    logits[12] = NAN  # all NaN
    logits[13, ::4] = -INF  # a normal row with -inf logits
    excluded[4, mid] = excluded[5, last] = excluded[6, 3] = excluded[6, last - 1] = False
    excluded[9, 0] = excluded[10, 2] = excluded[10, 5] = excluded[11, mid] = True
    kinds = ["nan" if bool(torch.isnan(r).any()) else "inf" if bool(torch.isposinf(r).any()) else "normal"
             for r in logits]
    return logits.to(dtype), excluded, uniforms.to(torch.float64 if dtype == torch.float64 else torch.float32), kinds


def assert_same_proposals(got, want, *, tol, name=""):
    (tok, lp, n), (rtok, rlp, rn) = got, want
    assert torch.equal(tok.cpu(), rtok), f"{name} tokens {tok.tolist()} != {rtok.tolist()}"
    assert torch.equal(n.cpu(), rn), f"{name} num_allowed {n.tolist()} != {rn.tolist()}"
    assert torch.equal(torch.isnan(lp.cpu()), torch.isnan(rlp)), f"{name} NaN log-probs {lp.tolist()} != {rlp.tolist()}"
    assert_close(lp.cpu(), rlp, rtol=tol, atol=tol, name=f"{name} logprobs")


NONFINITE_SETTINGS = [(1.0, 1.0), (0.8, 0.7), (0.0, 1.0), (0.0, 0.7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature,top_p", NONFINITE_SETTINGS)
def test_the_spec_on_non_finite_logits(dtype, temperature, top_p):
    """The spec's rule, written out: a NaN row, or a +inf row at T > 0, is (-1, NaN, 0) whatever top_p and the
    exclusions; at T = 0 a +inf logit is the greedy maximum (the first allowed one), and for top_p < 1 the nucleus is
    the +inf tokens (every one excluded: -1, -inf, 0). The normal rows propose what they propose alone."""
    logits, excluded, uniforms, kinds = nonfinite_batch(45, dtype)
    tok, lp, n = reference.propose_token(logits, excluded, uniforms, temperature=temperature, top_p=top_p)
    for b, kind in enumerate(kinds):
        row = logits[b]
        if kind == "nan" or (kind == "inf" and temperature > 0):
            assert (int(tok[b]), int(n[b])) == (-1, 0) and bool(torch.isnan(lp[b])), (b, kind)
        elif kind == "inf":
            allowed = (torch.isposinf(row) if top_p < 1 else row > -INF) & ~excluded[b]
            want = int(torch.where(allowed, row, -INF).argmax()) if bool(allowed.any()) else -1
            assert (int(tok[b]), int(n[b])) == (want, int(allowed.sum())), (b, kind)
            assert float(lp[b]) == (0.0 if want >= 0 else -INF)
    if temperature == 0:
        assert int(tok[6]) == 3  # the first of two +inf
        if top_p < 1:  # the nucleus is the +inf tokens, all excluded
            assert int(tok[10]) == -1 and float(lp[10]) == -INF
    normal = [b for b, kind in enumerate(kinds) if kind == "normal"]
    alone = reference.propose_token(logits[normal], excluded[normal], uniforms[normal], temperature=temperature,
                                    top_p=top_p)
    assert_same_proposals((tok[normal], lp[normal], n[normal]), alone, tol=0, name="normal rows")
    assert bool((tok[normal] >= 0).all())


@needs_cpp
@pytest.mark.parametrize("V", NONFINITE_V)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("temperature,top_p", NONFINITE_SETTINGS)
def test_cpp_matches_the_spec_on_non_finite_logits(V, dtype, temperature, top_p):
    """The C++ kernel ignored a NaN logit (and proposed a token under top_p < 1 where the spec's nucleus was empty)
    and proposed the +inf token at T > 0 where the spec returned one outside its allowed set."""
    logits, excluded, uniforms, _ = nonfinite_batch(V, dtype)
    got = ops.propose_token(logits, excluded, uniforms, temperature=temperature, top_p=top_p)
    want = reference.propose_token(logits.double() if dtype != torch.float32 else logits, excluded,
                                   uniforms, temperature=temperature, top_p=top_p)
    assert_same_proposals(got, want, tol=1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.interpret
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU")
@pytest.mark.parametrize("V", NONFINITE_V)
@pytest.mark.parametrize("temperature,top_p", NONFINITE_SETTINGS)
def test_triton_matches_the_spec_on_non_finite_logits(V, temperature, top_p, monkeypatch):
    """The Triton kernel on the same rows, with 16-wide tiles: the last one partial, a NaN or +inf in the first, a
    middle or the last tile; its max pass keeps NaN out of the max itself (tl.maximum's NaN rule differs between the
    GPU and the interpreter)."""
    pytest.importorskip("triton")
    from alignfast.kernels import proposal as K

    monkeypatch.setattr(K, "BLOCK_MAX", 16)
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    logits, excluded, uniforms, _ = nonfinite_batch(V, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy evaluates both sides of tl.where
        got = K.propose_token_triton(logits.to(dev), excluded.to(dev), uniforms.to(dev), temperature, top_p)
    want = reference.propose_token(logits, excluded, uniforms, temperature=temperature, top_p=top_p)
    assert_same_proposals(got, want, tol=1e-5, name="triton")
    if has_kernel("propose_token", "cpu"):
        assert_same_proposals(ops.propose_token(logits, excluded, uniforms, temperature=temperature, top_p=top_p),
                              want, tol=1e-5, name="cpp")


@needs_cpp
def test_a_nan_logit_is_not_read_as_minus_infinity():
    """The review's rows: with top_p < 1 the kernel skipped the NaN and proposed a token (the spec: an empty
    nucleus, -1 / -inf); with a +inf logit at T = 1 the spec returned the last index, outside its allowed set."""
    g = torch.Generator().manual_seed(0)
    for value in (NAN, INF):
        logits = torch.randn(1, 20, generator=g, dtype=torch.float64)
        logits[0, 5] = value
        for backend in ("auto", "reference"):
            with force_backend(backend):
                tok, lp, n = ops.propose_token(logits, torch.zeros_like(logits, dtype=torch.bool),
                                               torch.tensor([0.3], dtype=torch.float64), temperature=1.0, top_p=0.9)
            assert (int(tok), int(n)) == (-1, 0) and bool(torch.isnan(lp)), (value, backend)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_the_spec_in_float32_does_not_overflow_near_the_float32_maximum(top_p):
    """The spec scaled l / tau before subtracting the max: [3e38, 2.9e38, 0] at T = 0.5 overflowed float32 and gave
    token 2 with a NaN log-prob; the C++ kernel (which subtracts the raw max first) and the float64 spec give token 0.
    The spec now subtracts first too."""
    logits = torch.tensor([[3e38, 2.9e38, 0.0]])
    excluded, u = torch.zeros(1, 3, dtype=torch.bool), torch.tensor([0.3], dtype=torch.float64)
    got = reference.propose_token(logits, excluded, u, temperature=0.5, top_p=top_p)
    want = reference.propose_token(logits.double(), excluded, u, temperature=0.5, top_p=top_p)
    assert got[0].tolist() == want[0].tolist() == [0] and torch.isfinite(got[1]).all()
    assert got[1].double().tolist() == want[1].tolist() and got[2].tolist() == want[2].tolist()
    if has_kernel("propose_token", "cpu"):
        assert ops.propose_token(logits, excluded, u, temperature=0.5, top_p=top_p)[0].tolist() == [0]
