"""linear_token_logprobs (C++ on CPU) against the float64 reference token_logprobs(hidden @ W.T + b).

Tolerances:
  outputs: logits are float32 GEMM results of the given (possibly bf16) values, so the only error is
  float32 accumulation: logprob atol 2e-5, entropy atol 5e-5 (rtol 1e-5).
  gradients: float32 GEMMs over N or V terms: norm-wise relative 1e-5, elementwise rtol 1e-3 + atol
  1e-6 * max|ref|. bf16/fp16 gradients are rounded once to the dtype (dW summed in float32 first):
  norm-wise 4e-3 (bf16 half-ulp 2e-3 plus margin) / 1e-3 (fp16), elementwise atol 1e-2 * max|ref|
  (elements of dW that cancel to ~0 are only meaningful relative to the tensor's scale).
"""

from __future__ import annotations

import pytest
import torch

from alignfast import reference
from alignfast.ops import AlignfastArgumentError, linear_token_logprobs
from alignfast.ops._library import has_kernel, op
from alignfast.ops.linear_token_logprobs import default_chunk_size
from tests.utils import assert_close, random_mask

LP_TOL = dict(rtol=1e-5, atol=2e-5)
ENT_TOL = dict(rtol=1e-5, atol=5e-5)
GRAD_REL = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float64: 1e-12}
GRAD_ATOL_SCALE = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}

pytestmark = pytest.mark.skipif(not has_kernel("linear_token_logprobs", "cpu"),
                                reason="alignfast._C has no CPU kernel (extension not built)")


def make(shape_rows, H, V, dtype, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape_rows, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5 * 3).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    tokens = torch.randint(0, V, shape_rows, generator=g)
    return hidden, weight, b, tokens


def check_grad(got, ref, dtype, name):
    rel = GRAD_REL[dtype]
    assert_close(got, ref, name=name, rtol=1e-3 if dtype != torch.float64 else 1e-10,
                 atol=GRAD_ATOL_SCALE[dtype] * float(ref.abs().max()) + 1e-30, rel=rel)


def run_and_compare(hidden, weight, bias, tokens, *, mask=None, temperature=1.0, chunk_size=None,
                    grads=(True, True, True)):
    dtype = hidden.dtype
    leaves = [hidden.clone().requires_grad_(grads[0]), weight.clone().requires_grad_(grads[1]),
              None if bias is None else bias.clone().requires_grad_(grads[2])]
    lp, ent = linear_token_logprobs(leaves[0], leaves[1], tokens, bias=leaves[2], temperature=temperature, mask=mask,
                                    return_entropy=True, chunk_size=chunk_size)
    assert lp.shape == ent.shape == tokens.shape
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    g_lp, g_ent = torch.randn(tokens.shape), torch.randn(tokens.shape)
    (lp * g_lp.to(lp.dtype) + ent * g_ent.to(lp.dtype)).sum().backward()

    refs = [None if x is None else x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    r_lp, r_ent = reference.linear_token_logprobs(refs[0], refs[1], tokens, bias=refs[2], temperature=temperature,
                                                  mask=mask, return_entropy=True)
    (r_lp * g_lp.double() + r_ent * g_ent.double()).sum().backward()
    assert_close(lp, r_lp, name="logprobs", **LP_TOL)
    assert_close(ent, r_ent, name="entropy", **ENT_TOL)
    for name, leaf, ref, want in zip(("dhidden", "dweight", "dbias"), leaves, refs, grads):
        if leaf is None:
            continue
        if not want:
            assert leaf.grad is None
            continue
        assert leaf.grad.dtype == dtype
        check_grad(leaf.grad, ref.grad, dtype, name)
    return lp, ent, leaves


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 7, 1000])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_matches_reference(dtype, V, temperature):
    hidden, weight, bias, tokens = make((4, 9), 32, V, dtype)
    run_and_compare(hidden, weight, bias, tokens, mask=random_mask(4, 9), temperature=temperature, chunk_size=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocabulary(dtype):
    V = 32000 if dtype == torch.float32 else 151936
    hidden, weight, bias, tokens = make((5,), 16, V, dtype)
    run_and_compare(hidden, weight, bias, tokens, chunk_size=2)


@pytest.mark.parametrize("chunk_size", [1, 5, None, 1000])
def test_chunking_does_not_change_results(chunk_size):
    hidden, weight, bias, tokens = make((3, 11), 24, 257, torch.float32)
    mask = random_mask(3, 11)
    lp, ent, _ = run_and_compare(hidden, weight, bias, tokens, mask=mask, chunk_size=chunk_size)
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()


def test_no_bias_float64_and_gradcheck():
    hidden, weight, _, tokens = make((2, 3), 5, 9, torch.float64, bias=False)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    run_and_compare(hidden, weight, None, tokens, mask=mask, temperature=0.7, chunk_size=2)
    hidden, weight, bias, tokens = make((2, 3), 5, 9, torch.float64)
    inputs = tuple(x.clone().requires_grad_() for x in (hidden, weight, bias))

    def f(h, w, b):
        return linear_token_logprobs(h, w, tokens, bias=b, mask=mask, temperature=0.7, return_entropy=True,
                                     chunk_size=2)

    assert torch.autograd.gradcheck(f, inputs)


def test_frozen_weight_and_bias():
    """A frozen lm_head (LoRA, frozen target): only dhidden is computed."""
    hidden, weight, bias, tokens = make((6,), 16, 100, torch.bfloat16)
    run_and_compare(hidden, weight, bias, tokens, grads=(True, False, False), chunk_size=4)


def test_masked_rows_get_zero_hidden_gradient():
    hidden, weight, bias, tokens = make((5, 6), 16, 64, torch.float32)
    mask = random_mask(5, 6)
    tokens[~mask] = -1  # padding ids are never read
    _, _, leaves = run_and_compare(hidden, weight, bias, tokens, mask=mask, chunk_size=3)
    assert (leaves[0].grad[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_vocabulary_tiles_on_several_workers(chunk_size, dtype):
    """Weights on CPU go by vocabulary tiles, taken by the workers from a shared counter, with dh summed in
    tile order: results match the reference and are bitwise the same from run to run. ~50 valid rows x 2003
    x 128 is enough work for two workers (kMinTileFlops in csrc/cpu/linear_token_logprobs.cpp); chunk_size=3
    makes the tiles narrow enough to split the rows into blocks too (dW added over blocks: for bfloat16 in a
    float32 sum, rounded once; with one block bfloat16's dW tile is formed in the worker's W-tile buffer).
    Rows 0-3 are confident (the target's tile holds nearly all the mass)."""
    hidden, weight, bias, tokens = make((4, 16), 128, 2003, dtype, seed=3)
    tokens[0, :4] = torch.tensor([5, 700, 1400, 2002])
    hidden[0, :4] = weight[tokens[0, :4]] * 2  # logprobs -3e-8 to -1.4e-4
    mask = random_mask(4, 16)
    mask[0, :4] = True
    torch.manual_seed(0)  # the same upstream gradients in both runs
    lp, _, leaves = run_and_compare(hidden, weight, bias, tokens, mask=mask, temperature=0.7, chunk_size=chunk_size)
    r_lp = reference.linear_token_logprobs(hidden.double(), weight.double(), tokens, bias=bias.double(),
                                           temperature=0.7)
    assert (r_lp[0, :4] > -1e-3).all() and (r_lp[0, :4] < 0).all() and r_lp[0, :4].max() > -1e-6
    torch.testing.assert_close(lp[0, :4].double(), r_lp[0, :4], rtol=1e-4, atol=0)  # relative, not absolute
    torch.manual_seed(0)
    again = run_and_compare(hidden, weight, bias, tokens, mask=mask, temperature=0.7, chunk_size=chunk_size)[2]
    for first, second in zip(leaves, again):
        assert torch.equal(first.grad, second.grad)


def test_default_chunk_size():
    # float32 chunk logits are 1/16 of the materialised logits in the input dtype (bf16: N/32 rows) ...
    assert default_chunk_size(16384, 151936, torch.bfloat16) == 512
    assert default_chunk_size(2048, 32000, torch.float32) == 128
    # ... with at least 64 rows, never more than N, and at most 1 GiB of float32 logits
    assert default_chunk_size(100, 32000, torch.float32) == 64
    assert default_chunk_size(10, 32000, torch.float32) == 10
    assert default_chunk_size(10 ** 7, 151936, torch.float32) == (1 << 30) // (151936 * 4)
    # CPU (vocabulary tiles over all rows): no 64-row floor, and 1/32 for bf16/fp16 (float32 copies of hidden,
    # dhidden and the W tiles take the rest of the 1/8)
    assert default_chunk_size(100, 32000, torch.float32, min_rows=1) == 7
    assert default_chunk_size(1024, 32000, torch.bfloat16, min_rows=1, share=32) == 16


def test_opcheck():
    hidden, weight, bias, tokens = make((6,), 8, 21, torch.float32)
    mask = torch.tensor([True, False, True, True, False, True])
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), tokens, mask, 0.7, True, 4)
    torch.library.opcheck(op("linear_token_logprobs"), args)
    lp, ent, lse = op("linear_token_logprobs")(hidden.detach(), weight.detach(), bias.detach(), tokens, mask, 0.7,
                                               True, 4)
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op("linear_token_logprobs_backward"),
                          (torch.randn(6), torch.randn(6), hidden.detach(), weight.detach(), bias.detach(), tokens,
                           mask, lp, ent, lse, 0.7, 4, True, True, True), test_utils=quick)


def test_bad_arguments():
    hidden, weight, bias, tokens = make((4,), 8, 10, torch.float32)
    with pytest.raises(AlignfastArgumentError, match="'weight'"):
        linear_token_logprobs(hidden, weight[:, :7], tokens)
    with pytest.raises(AlignfastArgumentError, match="'weight'"):
        linear_token_logprobs(hidden, weight.double(), tokens)
    with pytest.raises(AlignfastArgumentError, match="'bias'"):
        linear_token_logprobs(hidden, weight, tokens, bias=bias[:9])
    with pytest.raises(AlignfastArgumentError, match="'tokens'"):
        linear_token_logprobs(hidden, weight, tokens[:3])
    with pytest.raises(AlignfastArgumentError, match="'tokens'"):
        bad = tokens.clone()
        bad[1] = 10
        linear_token_logprobs(hidden, weight, bad)
    with pytest.raises(AlignfastArgumentError, match="'chunk_size'"):
        linear_token_logprobs(hidden, weight, tokens, chunk_size=0)
    with pytest.raises(AlignfastArgumentError, match="'temperature'"):
        linear_token_logprobs(hidden, weight, tokens, temperature=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_cuda_large_vocabulary(dtype):
    hidden, weight, bias, tokens = make((4, 16), 256, 151936, dtype)
    mask = random_mask(4, 16)
    leaves = [x.cuda().requires_grad_() for x in (hidden, weight, bias)]
    lp, ent = linear_token_logprobs(leaves[0], leaves[1], tokens.cuda(), bias=leaves[2], mask=mask.cuda(),
                                    return_entropy=True, chunk_size=16)
    g_lp, g_ent = torch.randn(4, 16), torch.randn(4, 16)
    (lp * g_lp.cuda() + ent * g_ent.cuda()).sum().backward()
    refs = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    r_lp, r_ent = reference.linear_token_logprobs(refs[0], refs[1], tokens, bias=refs[2], mask=mask,
                                                  return_entropy=True)
    (r_lp * g_lp.double() + r_ent * g_ent.double()).sum().backward()
    if dtype == torch.float64:  # float64 GEMMs and kernels: rounding only
        assert_close(lp, r_lp, name="logprobs", rtol=1e-10, atol=1e-10)
        assert_close(ent, r_ent, name="entropy", rtol=1e-10, atol=1e-10)
    else:
        assert_close(lp, r_lp, name="logprobs", rtol=1e-5, atol=1e-4)  # TF32-free float32 GEMM; bf16 -> fp32 out
        assert_close(ent, r_ent, name="entropy", rtol=1e-5, atol=2e-4)
    for name, leaf, ref in zip(("dhidden", "dweight", "dbias"), leaves, refs):
        # on CUDA dz is rounded to the weight's dtype before the gradient GEMMs (tensor cores): 2 roundings
        rel = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
        assert_close(leaf.grad, ref.grad, name=name, rtol=1.0, atol=float("inf"), rel=rel)


@pytest.mark.parametrize("library", ["aten", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_cpu_gemm_libraries(library, dtype):
    """The op's GEMMs on ATen's and on oneDNN's kernels (ops/cpu_gemm.py): a bias, a mask, entropy, a budget that
    splits the rows into blocks (dW accumulated over blocks: the accumulating GEMM), two tile workers."""
    from alignfast.ops import cpu_gemm

    if library == "onednn" and not cpu_gemm.onednn_available():
        pytest.skip("this libtorch does not export oneDNN's matmul")
    # ~38 valid rows x V=4000 x H=64 is two workers' worth (kMinTileFlops) and, at chunk 2, two row blocks.
    hidden, weight, bias, tokens = make((6, 9), 64, 4000, dtype, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # enough work for two tile workers (each runs its GEMMs single-threaded)
    try:
        # every tile's GEMM on the library whatever its size, oneDNN's row counts on its grid (the overlapping
        # second call, and for dh's accumulation the restored overlap rows: csrc/cpu/gemm.cpp)
        with cpu_gemm.use(library), cpu_gemm.smallest_gemm(0), cpu_gemm.exact_row_counts(0):
            run_and_compare(hidden, weight, bias, tokens, mask=random_mask(6, 9), chunk_size=2)
    finally:
        torch.set_num_threads(threads)


def skip_without_bf16_products():
    from alignfast.ops import cpu_gemm

    if not cpu_gemm.onednn_available():
        pytest.skip("no oneDNN matmul here")
    with cpu_gemm.use("onednn"):
        if not cpu_gemm.bf16_products():
            pytest.skip("no bf16 x bf16 -> float32 products on this CPU (needs AVX512_BF16)")


BF16_PRODUCT_CASES = {
    # rows, H, V, chunk, masked, bias, grads (hidden, weight, bias), temperature
    # 35 rows at chunk 3: row blocks of 16, 16 and 3 (the last padded to 16)
    "odd H and V, row blocks": ((5, 7), 33, 1001, 3, False, True, (True, True, True), 0.7),
    "masked rows, row blocks": ((6, 9), 40, 901, 2, True, True, (True, True, True), 1.0),
    "two workers, one block": ((6, 9), 64, 4000, None, False, False, (True, True, False), 1.0),
    "frozen weight (LoRA)": ((4, 9), 32, 700, None, True, True, (True, False, False), 1.0),
    "frozen hidden": ((35,), 48, 515, 2, False, True, (False, True, True), 1.5),
    "one row": ((1,), 16, 130, None, False, True, (True, True, True), 1.0),
    # 16 x 16 register blocks with edges everywhere: 100 word pairs of H (96 + 4), 37 rows (32 + 5), tiles that
    # end in a partial 64-column block (the last tile 57 columns at two threads), odd K for dh's product
    "AVX-512 blocks and their edges": ((37,), 200, 3001, None, False, True, (True, True, True), 1.0),
}


@pytest.mark.parametrize("case", list(BF16_PRODUCT_CASES), ids=list(BF16_PRODUCT_CASES))
def test_bf16_products(case):
    """bfloat16 weights as bf16 x bf16 -> float32 products on oneDNN's brgemm (csrc/cpu/bf16_gemm.h), where the CPU
    has AVX512_BF16. Their edges: an odd H (the products' K padded with a zero column), odd tile widths and row
    counts (padded K of the dh and dW products), several row blocks (dW summed in float32 over blocks), no bias,
    frozen operands (only some products run), and the edges of the AVX-512 packing and rounding blocks. The
    reference tolerances are the float32 path's: dz is rounded to bf16 before the dh and dW products, as eager's
    bf16 logits gradient is, and that stays within them."""
    from alignfast.ops import cpu_gemm

    skip_without_bf16_products()
    rows, H, V, chunk, masked, with_bias, grads, temperature = BF16_PRODUCT_CASES[case]
    hidden, weight, bias, tokens = make(rows, H, V, torch.bfloat16, bias=with_bias, seed=5)
    mask = random_mask(*rows, generator=torch.Generator().manual_seed(7)) if masked else None
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu_gemm.use("onednn"):
            assert cpu_gemm.bf16_products()
            torch.manual_seed(0)
            lp, ent, leaves = run_and_compare(hidden, weight, bias, tokens, mask=mask, temperature=temperature,
                                              chunk_size=chunk, grads=grads)
        with cpu_gemm.use("aten"):
            assert not cpu_gemm.bf16_products()
            torch.manual_seed(0)
            f_lp, f_ent, f_leaves = run_and_compare(hidden, weight, bias, tokens, mask=mask, temperature=temperature,
                                                    chunk_size=chunk, grads=grads)
    finally:
        torch.set_num_threads(threads)
    # The same float32 logits up to the order of their sums: the float32 path's outputs to float32 rounding.
    torch.testing.assert_close(lp, f_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent, f_ent, rtol=1e-5, atol=5e-5)
    # The gradients: the float32 path's to dz's bf16 rounding and the final one (a few bf16 ulp, norm-wise).
    for name, leaf, f_leaf in zip(("dhidden", "dweight", "dbias"), leaves, f_leaves):
        if leaf is not None and leaf.grad is not None:
            assert_close(leaf.grad, f_leaf.grad, name=name, rtol=1.0, atol=float("inf"), rel=8e-3)
    # W as a strided view (rows H + 1 apart): the products read it through a contiguous copy, same results.
    strided = torch.cat([weight, weight[:, :1]], dim=1)[:, :H]
    with cpu_gemm.use("onednn"):
        got = linear_token_logprobs(hidden, strided, tokens, bias=bias, mask=mask, temperature=temperature,
                                    chunk_size=chunk)
        want = linear_token_logprobs(hidden, weight, tokens, bias=bias, mask=mask, temperature=temperature,
                                     chunk_size=chunk)
    assert torch.equal(got, want)


def test_bf16_products_follow_the_settings():
    """The bf16 products run only where oneDNN is the chosen library and torch has oneDNN enabled."""
    from alignfast.ops import cpu_gemm

    skip_without_bf16_products()
    with cpu_gemm.use("onednn"):
        with torch.backends.mkldnn.flags(enabled=False):
            assert not cpu_gemm.bf16_products()
        assert cpu_gemm.bf16_products()
    with cpu_gemm.use("aten"):
        assert not cpu_gemm.bf16_products()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_counts_reuse_a_fixed_set_of_kernels(dtype):
    """The tile GEMMs' shapes must not follow the row count (a training run's micro-batches each bring a new one):
    every shape is a kernel oneDNN compiles and keeps (bench/NOTES-gemm.md, "memory"). float32 goes to oneDNN's
    matmul as row counts from a fixed grid and K blocks (cpu/gemm.cpp); the bf16 products pad rows to 16 and block
    them (Bf16Tiles). 100 row counts compile the kernels of their range (~30-100 shapes, against ~300 unblocked);
    100 further counts in the same range, interleaved with them, add almost none."""
    import alignfast._C as C
    from alignfast.ops import cpu_gemm

    if not cpu_gemm.onednn_available():
        pytest.skip("no oneDNN matmul here")
    weight = (torch.randn(3000, 64) / 8).to(dtype).requires_grad_()
    # exact_row_counts(0): no count is admitted as it is (that allowance, 8 per shape family, has its own test in
    # tests/ops/test_linear.py), so the bound below is the grid's and the blocks' alone
    with cpu_gemm.use("onednn"), cpu_gemm.smallest_gemm(0), cpu_gemm.exact_row_counts(0):
        if dtype == torch.bfloat16 and not cpu_gemm.bf16_products():
            pytest.skip("no bf16 x bf16 -> float32 products on this CPU (needs AVX512_BF16)")
        count = C.bf16_gemm_shapes if dtype == torch.bfloat16 else C.onednn_shapes

        def run(rows):
            hidden = torch.randn(rows, 64).to(dtype).requires_grad_()
            tokens = torch.randint(0, 3000, (rows,))
            linear_token_logprobs(hidden, weight, tokens).sum().backward()

        before = count()
        for rows in range(200, 700, 5):
            run(rows)
        warm = count()
        for rows in range(202, 702, 5):
            run(rows)
        assert warm - before < 200, warm - before
        assert count() - warm <= 8, (warm - before, count() - warm)


@pytest.mark.skipif(not has_kernel("linear_token_logprobs", "cpu"), reason="alignfast._C not built")
def test_a_rows_result_does_not_depend_on_the_micro_batch_split_at_two_threads():
    """The docstring promises that a batch of at most 64 rows gives per-row results independent of the split; with
    2 threads the tile width followed the row count (8 rows: one worker, one tile over V; 64 rows: two tiles), so
    64 rows in one call and in 8 calls of 8 differed by ~1e-6. Tiles are now cut from V and the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        H, V = 64, 8000
        w, h, tok = torch.randn(V, H) / H ** 0.5, torch.randn(64, H), torch.randint(0, V, (64,))
        whole = linear_token_logprobs(h, w, tok, return_entropy=True)
        parts = [linear_token_logprobs(h[i:i + 8], w, tok[i:i + 8], return_entropy=True) for i in range(0, 64, 8)]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    finally:
        torch.set_num_threads(threads)
