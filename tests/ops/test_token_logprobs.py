"""alignfast.ops.token_logprobs (C++ on CPU) against the float64 reference.

Tolerances (stated once, used below):
  outputs are computed in float32 from the given logits; against float64 on the same values the error is
  float32 accumulation only: logprob atol 2e-5 + rtol 1e-5, entropy atol 5e-5 + rtol 1e-5 (entropies
  reach ~12 at V = 151936).
  gradients are rounded once to the logits' dtype: rtol = that dtype's half-ulp plus margin
  (fp16 2e-3, bf16 1.6e-2) and an atol at the dtype's absolute resolution near the gradient scale
  (fp16 gradients of ~1/V are subnormal: 1e-7). In float32 the error is the float32 logsumexp and
  entropy (sums over V terms, ~1e-6 relative) carried into p_v and p_v (E[z] - z_v), which cancels
  where -log p_v ~ entropy: rtol 1e-4, atol 2e-7 (gradients are O(1) at most), norm-wise 2e-5.
"""

from __future__ import annotations

import pytest
import torch

from alignfast import reference
from alignfast.ops import AlignfastArgumentError, force_backend, token_logprobs
from alignfast.ops._library import has_kernel, op
from tests.utils import assert_close, random_mask

LP_TOL = dict(rtol=1e-5, atol=2e-5)
ENT_TOL = dict(rtol=1e-5, atol=5e-5)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-4, atol=2e-7, rel=2e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-7),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-9),
    torch.float64: dict(rtol=1e-10, atol=1e-14),
}

pytestmark = pytest.mark.skipif(not has_kernel("token_logprobs", "cpu"),
                                reason="alignfast._C has no CPU kernel (extension not built)")


def make_logits(shape, dtype, *, scale=3.0, generator=None):
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def reference_and_grads(logits, tokens, mask, temperature, g_lp, g_ent):
    """float64 reference outputs and d(sum g_lp*lp + g_ent*ent)/dlogits."""
    x = logits.detach().to(torch.float64).requires_grad_()
    lp, ent = reference.token_logprobs(x, tokens, temperature=temperature, mask=mask, return_entropy=True)
    (lp * g_lp.double() + ent * g_ent.double()).sum().backward()
    return lp.detach(), ent.detach(), x.grad


def run_and_compare(logits, tokens, mask, temperature):
    g_lp = torch.randn(tokens.shape)
    g_ent = torch.randn(tokens.shape)
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, tokens, temperature=temperature, mask=mask, return_entropy=True)
    assert lp.dtype == ent.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    (lp * g_lp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    assert x.grad.dtype == logits.dtype
    r_lp, r_ent, r_grad = reference_and_grads(logits, tokens, mask, temperature, g_lp, g_ent)
    assert_close(lp, r_lp, name="logprobs", **LP_TOL)
    assert_close(ent, r_ent, name="entropy", **ENT_TOL)
    assert_close(x.grad, r_grad, name="dlogits", **GRAD_TOL[logits.dtype])
    return lp, ent, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 7, 1000, 32000])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_matches_reference(dtype, V, temperature):
    B, T = (3, 5) if V < 32000 else (2, 3)
    logits = make_logits((B, T, V), dtype)
    tokens = torch.randint(0, V, (B, T))
    mask = random_mask(B, T)
    run_and_compare(logits, tokens, mask, temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocabulary(dtype):
    V = 151936
    logits = make_logits((2, 2, V), dtype)
    tokens = torch.randint(0, V, (2, 2))
    run_and_compare(logits, tokens, None, 1.0)


def test_float64_is_computed_in_float64():
    logits = make_logits((3, 4, 1000), torch.float64)
    tokens = torch.randint(0, 1000, (3, 4))
    lp, ent, _ = run_and_compare(logits, tokens, random_mask(3, 4), 0.7)
    assert lp.dtype == torch.float64


def test_float64_entropy_of_a_confident_row():
    """One logit far above the rest (V = 151936, T = 0.7; the entropy is 4.5e-9, max z = 36). As logsumexp - sum softmax(z) z
    the reference lost 9e-4 of it in float64 (two numbers near 36); shifted by max z it keeps 3e-8 (log(1 + tiny)).
    The op's kernel, which takes -log1p of the others' sum, is held to 1e-12. The truth is mpmath's, at 30
    digits."""
    mpmath = pytest.importorskip("mpmath")

    g = torch.Generator().manual_seed(4)
    V, T = 151936, 0.7
    logits = torch.randn(1, 1, V, generator=g, dtype=torch.float64)
    logits[0, 0, 17] = 25.0
    with mpmath.workdps(30):
        z = [mpmath.mpf(x) / mpmath.mpf(T) for x in logits[0, 0].tolist()]
        top = max(z)
        lse = top + mpmath.log(mpmath.fsum(mpmath.exp(x - top) for x in z))
        truth = float(-mpmath.fsum(mpmath.exp(x - lse) * (x - lse) for x in z))
    tokens = torch.tensor([[17]])
    _, ref_ent = reference.token_logprobs(logits, tokens, temperature=T, return_entropy=True)
    _, ent = token_logprobs(logits, tokens, temperature=T, return_entropy=True)
    assert truth < 1e-8  # confident
    assert abs(ref_ent.item() - truth) <= 1e-7 * truth
    assert abs(ent.item() - truth) <= 1e-12 * truth


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masked_positions_are_zero_with_zero_gradient(dtype):
    B, T, V = 6, 7, 300
    logits = make_logits((B, T, V), dtype)
    mask = random_mask(B, T)
    assert (~mask).all(dim=1).any(), "want a fully masked row"
    tokens = torch.randint(0, V, (B, T))
    tokens[~mask] = -100  # padding ids must not be read at masked positions
    lp, ent, grad = run_and_compare(logits, tokens, mask, 1.0)
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()
    assert (grad[~mask] == 0).all()


def test_non_finite_logits_at_masked_positions_give_zero_gradient():
    """The fused kernel skips masked rows: a masked row of NaN, +inf or -inf logits gets a zero gradient row. (The
    reference reduces masked rows as TRL's code does, so its gradient there is NaN: alignfast/reference/logprobs.py
    says why it is left so.)"""
    logits = make_logits((2, 4, 50), torch.float32)
    tokens = torch.randint(0, 50, (2, 4))
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 1:] = False
    logits[1, 1] = float("nan")
    logits[1, 2, 7] = float("inf")
    logits[1, 3] = float("-inf")
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, tokens, mask=mask, return_entropy=True)
    (grad,) = torch.autograd.grad((lp + ent).sum(), x)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and (lp[~mask] == 0).all()
    assert (grad[~mask] == 0).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_negative_infinity_logits(dtype):
    B, T, V = 2, 4, 1000
    logits = make_logits((B, T, V), dtype)
    tokens = torch.randint(0, V, (B, T))
    logits[0, 0, : V // 2] = float("-inf")  # a partly -inf row
    tokens[0, 0] = V - 1
    logits[0, 1, ::3] = float("-inf")  # holes
    tokens[0, 1] = 1
    logits[1, 2, tokens[1, 2]] = float("-inf")  # a -inf target
    logits[1, 3, :] = float("-inf")  # all -inf but one entry, which is the target
    logits[1, 3, tokens[1, 3]] = 0.0
    lp, ent, grad = run_and_compare(logits, tokens, None, 1.3)
    assert lp[1, 2] == float("-inf")
    assert lp[1, 3] == 0 and ent[1, 3] == 0
    assert torch.isfinite(ent).all() and not torch.isnan(grad).any()


def max_placement_rows(dtype, V=5000, seed=0):
    """Rows whose maximum sits in different blocks of the CPU kernel (1024 entries a block): the kernel sums a
    block against the running max and sums it again only when the block holds a new maximum, so each way a
    new maximum can arrive gets a row. Returns ([1, 8, V] logits, [1, 8] tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, V, generator=g, dtype=torch.float64) * 3
    ramp = torch.linspace(-40, 40, V, dtype=torch.float64)
    x[0] = ramp + torch.randn(V, generator=g, dtype=torch.float64) * 0.1  # a new max in every block
    x[1] = -ramp                                         # the max in the first block, far below after
    x[2, -1] = 60.0                                      # the max is the last entry (the scalar tail)
    x[3, 1500] = 90.0                                    # one spike far above the running max (a big rescale)
    x[4, :2048] = float("-inf")                          # no finite entry in the first blocks
    x[5, 3 * 1024 + 7] = 30.0                            # a record in a later block, target in an earlier one
    x[6] = ramp.flip(0) * 0.01                           # nearly flat, max first
    x[7, ::1024] = 25.0                                  # ties: equal maxima in every block
    tokens = torch.randint(0, V, (1, 8), generator=g)
    tokens[0, 0] = V - 1
    tokens[0, 4] = 3000
    tokens[0, 5] = 10
    return x.to(dtype).unsqueeze(0), tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_maximum_in_any_block(dtype, temperature):
    logits, tokens = max_placement_rows(dtype)
    run_and_compare(logits, tokens, None, temperature)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_confident_rows_keep_the_target_gradient(dtype):
    """1 - p_target for p_target ~ 1 - 1e-6: a naive onehot - softmax in bf16 rounds it to 0."""
    B, T, V = 2, 3, 1000
    logits = make_logits((B, T, V), dtype, scale=1.0)
    tokens = torch.randint(0, V, (B, T))
    for i in range(B):
        for j in range(T):
            logits[i, j, tokens[i, j]] = 16.0 + 2 * j
    lp, _, grad = run_and_compare(logits, tokens, None, 1.0)
    assert (lp < 0).all(), "logprob of a confident row must stay strictly below 0"
    target_grad = grad.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert (target_grad != 0).all()


def test_logprobs_only_and_gradients_without_entropy():
    logits = make_logits((3, 5, 777), torch.float32).requires_grad_()
    tokens = torch.randint(0, 777, (3, 5))
    mask = random_mask(3, 5)
    lp = token_logprobs(logits, tokens, mask=mask)
    lp.sum().backward()
    x = logits.detach().double().requires_grad_()
    r = reference.token_logprobs(x, tokens, mask=mask)
    r.sum().backward()
    assert_close(lp, r, name="logprobs", **LP_TOL)
    assert_close(logits.grad, x.grad, name="dlogits", **GRAD_TOL[torch.float32])


def test_entropy_only_gradient():
    logits = make_logits((2, 3, 50), torch.float32).requires_grad_()
    tokens = torch.randint(0, 50, (2, 3))
    _, ent = token_logprobs(logits, tokens, return_entropy=True, temperature=0.7)
    ent.sum().backward()
    x = logits.detach().double().requires_grad_()
    _, r = reference.token_logprobs(x, tokens, return_entropy=True, temperature=0.7)
    r.sum().backward()
    assert_close(logits.grad, x.grad, name="dlogits", **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("shape", [(11,), (4, 11), (2, 3, 11), (2, 2, 3, 11), (1, 1, 11)])
def test_shapes(shape):
    logits = make_logits(shape, torch.float32)
    tokens = torch.randint(0, 11, shape[:-1])
    lp, ent = token_logprobs(logits, tokens, return_entropy=True)
    assert lp.shape == ent.shape == tokens.shape
    r_lp, r_ent = reference.token_logprobs(logits.double(), tokens, return_entropy=True)
    assert_close(lp, r_lp, **LP_TOL)
    assert_close(ent, r_ent, **ENT_TOL)


def test_strided_logits_slice_and_int32_tokens():
    """logits[:, :-1] (no [N, V] view exists) and logits with a padded vocabulary stride."""
    full = make_logits((3, 9, 130), torch.bfloat16)
    logits = full[:, :-1, :100]
    tokens = torch.randint(0, 100, (3, 8), dtype=torch.int32)
    mask = random_mask(3, 8)
    run_and_compare(logits, tokens, mask, 1.0)


def test_empty_batch():
    logits = torch.randn(0, 5, 13, requires_grad=True)
    tokens = torch.zeros(0, 5, dtype=torch.long)
    lp, ent = token_logprobs(logits, tokens, return_entropy=True)
    assert lp.shape == (0, 5)
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.shape == logits.shape


def test_reference_backend_agrees():
    logits = make_logits((2, 3, 64), torch.float32)
    tokens = torch.randint(0, 64, (2, 3))
    fast = token_logprobs(logits, tokens, temperature=0.7)
    with force_backend("reference"):
        ref = token_logprobs(logits, tokens, temperature=0.7)
    assert_close(fast, ref, **LP_TOL)


def test_gradcheck_float64():
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 3))
    mask = torch.tensor([[True, False, True], [True, True, False]])

    def f(x):
        lp, ent = token_logprobs(x, tokens, temperature=0.7, mask=mask, return_entropy=True)
        return lp, ent

    assert torch.autograd.gradcheck(f, (logits,))


def test_opcheck():
    logits = torch.randn(2, 3, 17, requires_grad=True)
    tokens = torch.randint(0, 17, (2, 3))
    mask = random_mask(2, 3)
    torch.library.opcheck(op("token_logprobs"), (logits, tokens, mask, 0.7, True))  # all checks, incl. aot (~8 s)
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op("token_logprobs"), (logits.to(torch.bfloat16), tokens, None, 1.0, False), test_utils=quick)
    lp, ent, lse = op("token_logprobs")(logits.detach(), tokens, mask, 0.7, True)
    torch.library.opcheck(op("token_logprobs_backward"),
                          (torch.randn(2, 3), torch.randn(2, 3), logits.detach(), tokens, mask, lp, ent, lse, 0.7, None),
                          test_utils=quick)


def test_torch_compile_fullgraph():
    logits = make_logits((2, 3, 40), torch.float32)
    tokens = torch.randint(0, 40, (2, 3))
    mask = random_mask(2, 3)

    def step(x):
        lp, ent = token_logprobs(x, tokens, temperature=0.7, mask=mask, return_entropy=True)
        return (lp - 0.1 * ent).sum()

    x_eager, x_comp = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    step(x_eager).backward()
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(x_comp)
    out.backward()
    assert_close(out, step(logits), **LP_TOL)
    assert torch.equal(x_comp.grad, x_eager.grad)


@pytest.mark.parametrize("position_valid", [True, False])
def test_token_out_of_range(position_valid):
    logits = torch.randn(2, 3, 10)
    tokens = torch.randint(0, 10, (2, 3))
    tokens[1, 2] = 10
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = position_valid
    if position_valid:
        with pytest.raises(AlignfastArgumentError, match="'tokens'.*10"):
            token_logprobs(logits, tokens, mask=mask)
    else:
        token_logprobs(logits, tokens, mask=mask)


def test_kernel_itself_rejects_bad_token_ids():
    """A direct torch.ops call bypasses the Python checks; the C++ kernel still names the argument."""
    with pytest.raises(RuntimeError, match="'tokens'"):
        op("token_logprobs")(torch.randn(1, 2, 5), torch.tensor([[0, -1]]), None, 1.0, False)


@pytest.mark.parametrize("bad", [
    dict(temperature=0.0), dict(temperature=float("nan")), dict(temperature=-1.0),
])
def test_bad_temperature(bad):
    with pytest.raises(AlignfastArgumentError, match="temperature"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), **bad)


def test_a_temperature_whose_reciprocal_overflows_float32_is_refused_on_every_entry():
    """1e-40 passed the '> 0' check and gave NaN log-probs (1/T overflows float32, in which the kernels scale).
    The smallest usable one still works; the Python wrappers and the C++ kernels (direct calls) refuse below it."""
    from alignfast.ops import linear_token_logprobs, propose_token
    from alignfast.ops._checks import MIN_TEMPERATURE

    logits, tokens = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    lp = token_logprobs(logits, tokens, temperature=MIN_TEMPERATURE * 1.001)  # a point mass: 0 at the max, else -inf
    assert lp.tolist() == [0.0 if logits[i].argmax() == 0 else float("-inf") for i in range(2)]
    message = r"argument 'temperature' \(1e-40\) is below 2.939e-39: 1/temperature overflows float32"
    with pytest.raises(AlignfastArgumentError, match=message):
        token_logprobs(logits, tokens, temperature=1e-40)
    with pytest.raises(AlignfastArgumentError, match=message):
        linear_token_logprobs(torch.randn(2, 3), torch.randn(5, 3), tokens, temperature=1e-40)
    excluded, u = torch.zeros(2, 5, dtype=torch.bool), torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(AlignfastArgumentError, match=message + ".*; use 0 for greedy"):
        propose_token(logits, excluded, u, temperature=1e-40)
    assert propose_token(logits, excluded, u, temperature=0.0)[0].tolist() == logits.argmax(-1).tolist()
    with pytest.raises(RuntimeError, match="'temperature': must be finite and > 0 with 1/temperature a finite float32"):
        op("token_logprobs")(logits.unsqueeze(0), tokens.unsqueeze(0), None, 1e-40, False)


def test_bad_arguments():
    with pytest.raises(AlignfastArgumentError, match="'tokens'"):
        token_logprobs(torch.randn(2, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(AlignfastArgumentError, match="'tokens'"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2))
    with pytest.raises(AlignfastArgumentError, match="'logits'"):
        token_logprobs(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(AlignfastArgumentError, match="'logits'"):
        token_logprobs(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(AlignfastArgumentError, match="'mask'"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), mask=torch.ones(3, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_large_vocabulary(dtype):
    V = 151936
    logits = make_logits((4, 8, V), dtype).cuda()
    tokens = torch.randint(0, V, (4, 8)).cuda()
    mask = random_mask(4, 8).cuda()
    logits[0, 1, tokens[0, 1]] = 25.0
    logits[1, 0, : V // 2] = float("-inf")
    g_lp, g_ent = torch.randn(4, 8), torch.randn(4, 8)
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, tokens, mask=mask, temperature=0.7, return_entropy=True)
    (lp * g_lp.cuda() + ent * g_ent.cuda()).sum().backward()
    r_lp, r_ent, r_grad = reference_and_grads(logits.cpu(), tokens.cpu(), mask.cpu(), 0.7, g_lp, g_ent)
    assert_close(lp, r_lp, name="logprobs", **LP_TOL)
    assert_close(ent, r_ent, name="entropy", **ENT_TOL)
    assert_close(x.grad, r_grad, name="dlogits", **GRAD_TOL[dtype])


def test_meta_tensors_take_the_shapes_only_path():
    """The token-id range check read values (Tensor.item() on a meta tensor raised); meta tensors are shapes only,
    as torch.compile's fake tensors are, and the op has a fake implementation for them."""
    logits, tokens = torch.empty(2, 3, 11, device="meta"), torch.empty(2, 3, dtype=torch.long, device="meta")
    out = token_logprobs(logits, tokens)
    assert out.shape == (2, 3) and out.device.type == "meta"
