"""alignfast.ops.linear and its GEMM op alignfast::mm (csrc/cpu/gemm.cpp), on both CPU GEMM libraries.

Every case runs with ATen's GEMMs and with oneDNN's (alignfast.ops.cpu_gemm), against float64 products:
orientations (transposed views are read in place), a bias, empty and 1-wide shapes, strided inputs that
oneDNN cannot read in place (ATen takes them), the op's schema (opcheck), the autograd math (gradcheck in
float64), float32 gradients of `linear` against float64, a frozen weight, and the TorchFunctionMode that
routes a Hugging Face model's F.linear calls here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignfast.ops import AlignfastArgumentError, cpu_gemm, linear
from alignfast.ops._library import has_kernel, op
from alignfast.ops.linear import RouteLinear, _Linear, route_linear

pytestmark = pytest.mark.skipif(not has_kernel("mm", "cpu"), reason="alignfast._C has no CPU kernel (not built)")

LIBRARIES = ["aten", pytest.param("onednn", marks=pytest.mark.skipif(
    not cpu_gemm.onednn_available(), reason="this libtorch does not export oneDNN's matmul"))]


@pytest.fixture(params=LIBRARIES)
def library(request):
    """Each library in turn, for GEMMs of any size (the size rule has its own test below), oneDNN's row counts
    always on its grid (one or two calls, the second overlapping the first: csrc/cpu/gemm.cpp)."""
    with cpu_gemm.use(request.param), cpu_gemm.smallest_gemm(0), cpu_gemm.exact_row_counts(0):
        assert cpu_gemm.current() == request.param
        yield request.param


def close_to_float64(got: torch.Tensor, want64: torch.Tensor, k: int):
    """float32 products: each element sums k terms, so its error is within ~k float32 roundings of the
    magnitudes summed (bounded here by the float64 product of the absolute values)."""
    assert got.dtype == torch.float32 and got.shape == want64.shape
    if got.numel() == 0:
        return
    err = (got.double() - want64).abs()
    assert torch.isfinite(got).all()
    assert (err <= 2e-7 * (k + 2) * want64.abs().clamp_min(1.0)).all(), err.max().item()


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 7), (67, 129, 257), (92, 576, 192), (4, 64, 1), (0, 4, 4),
                                   (4, 0, 4), (1000, 300, 70), (17, 40, 33)])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_mm_matches_float64(library, m, k, n, transpose_a, transpose_b, with_bias):
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a = torch.randn(k, m, generator=g).t() if transpose_a else torch.randn(m, k, generator=g)
    b = torch.randn(n, k, generator=g).t() if transpose_b else torch.randn(k, n, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    got = op("mm")(a, b, bias)
    want = a.double() @ b.double() + (bias.double() if with_bias else 0)
    abs_sum = a.double().abs() @ b.double().abs() + (bias.double().abs() if with_bias else 0)
    close_to_float64(got, want, k)
    assert ((got.double() - want).abs() <= 2e-7 * (k + 2) * abs_sum.clamp_min(1e-30)).all()


def test_strided_operands_are_taken_by_aten(library):
    """Column slices are neither contiguous nor transposed-contiguous: the op must still be exact to rounding."""
    a = torch.randn(20, 30)[:, ::2]
    b = torch.randn(30, 40)[::2, 1::3]
    close_to_float64(op("mm")(a, b), a.double() @ b.double(), a.shape[1])


def test_float64_stays_exact_and_bfloat16_works(library):
    a, b = torch.randn(9, 17, dtype=torch.float64), torch.randn(17, 5, dtype=torch.float64)
    assert torch.equal(op("mm")(a, b), a @ b)  # float64 is always ATen's mm
    ab, bb = a.bfloat16(), b.bfloat16()
    torch.testing.assert_close(op("mm")(ab, bb).float(), (ab.float() @ bb.float()), rtol=2e-2, atol=2e-2)


def test_the_two_libraries_agree_to_rounding():
    if not cpu_gemm.onednn_available():
        pytest.skip("oneDNN not reachable")
    a, b = torch.randn(92, 576), torch.randn(576, 1536)
    with cpu_gemm.use("aten"):
        x = op("mm")(a, b)
    with cpu_gemm.use("onednn"):
        y = op("mm")(a, b)
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)


def test_mm_schema_opcheck(library):
    a, b = torch.randn(6, 5, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    torch.library.opcheck(op("mm"), (a, b, bias))
    torch.library.opcheck(op("mm"), (a, b.detach().t().contiguous().t()))


def test_mm_autograd_gradcheck():
    a = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: op("mm")(a, b, c), (a, b, bias))
    assert torch.autograd.gradcheck(lambda a, b: op("mm")(a, b), (a, b))


def test_linear_function_gradcheck():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_Linear.apply, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: _Linear.apply(x, w, None), (x, w))


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_forward_and_gradients_match_float64(library, with_bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 48, generator=g, requires_grad=True)
    w = torch.randn(33, 48, generator=g).mul_(0.1).requires_grad_()
    b = torch.randn(33, generator=g).requires_grad_() if with_bias else None
    up = torch.randn(2, 7, 33, generator=g)
    y = linear(x, w, b)
    (y * up).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if with_bias else None
    y64 = F.linear(x64, w64, b64)
    (y64 * up.double()).sum().backward()
    close_to_float64(y.detach(), y64.detach(), 48)
    close_to_float64(x.grad, x64.grad, 33)
    close_to_float64(w.grad, w64.grad, 14)
    assert w.grad.is_contiguous() and w.grad.shape == w.shape  # dW in W's own layout, no transposed copy
    if with_bias:
        close_to_float64(b.grad, b64.grad, 14)


def test_frozen_weight_gets_no_gradient_and_x_without_grad(library):
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(4, 8)
    linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(5, 8), rtol=1e-5, atol=1e-5)
    w2 = torch.randn(4, 8, requires_grad=True)
    linear(torch.randn(5, 8), w2).sum().backward()
    assert w2.grad is not None and w2.grad.shape == (4, 8)


def test_non_float32_calls_f_linear_itself(library):
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    assert torch.equal(linear(x, w), F.linear(x, w))
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(linear(xb, wb), F.linear(xb, wb))


def test_bad_arguments_name_themselves():
    with pytest.raises(AlignfastArgumentError, match="'weight'"):
        linear(torch.randn(3, 4), torch.randn(2, 5))
    with pytest.raises(AlignfastArgumentError, match="'bias'"):
        linear(torch.randn(3, 4), torch.randn(2, 4), torch.randn(3))
    with pytest.raises(AlignfastArgumentError, match="'x'"):
        linear("not a tensor", torch.randn(2, 4))
    # dtypes: F.linear's own message ("expected m1 and m2 to have the same dtype") named neither argument
    with pytest.raises(AlignfastArgumentError, match="argument 'x' must have dtype in"):
        linear(torch.ones(3, 4, dtype=torch.int64), torch.randn(2, 4))
    with pytest.raises(AlignfastArgumentError, match="argument 'weight' must have x's dtype"):
        linear(torch.randn(3, 4), torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(AlignfastArgumentError, match="argument 'bias' must have x's dtype"):
        linear(torch.randn(3, 4), torch.randn(2, 4), torch.randn(2, dtype=torch.float64))
    # ... except under autocast, which casts them (as F.linear does there)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(2, 4))
    assert out.dtype == torch.bfloat16


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def test_route_linear_sends_a_models_linears_here_and_matches(library, monkeypatch):
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 11))
    plain = model(input_ids=ids).logits
    plain.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    calls = []
    original = _Linear.apply
    monkeypatch.setattr(_Linear, "apply", lambda *a: calls.append(1) or original(*a))
    with RouteLinear():
        routed = model(input_ids=ids).logits
    routed.square().mean().backward()
    assert len(calls) == 2 * 7 + 1  # 7 projections per layer and the LM head
    torch.testing.assert_close(routed, plain, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-6, msg=n)


def test_route_linear_is_a_no_op_on_aten():
    with cpu_gemm.use("aten"):
        with route_linear() as mode:
            assert mode is None


def test_settings_errors_and_restore(monkeypatch):
    with pytest.raises(AlignfastArgumentError, match="'ALIGNFAST_CPU_GEMM'.*'auto', 'aten', 'onednn'"):
        cpu_gemm.resolve("mkl")
    with pytest.raises(AlignfastArgumentError, match="'backend'"):
        cpu_gemm.set_backend("fastest")
    before = cpu_gemm.current()
    with cpu_gemm.use("aten"):
        assert cpu_gemm.current() == "aten"
    assert cpu_gemm.current() == before


@pytest.mark.parametrize("vendor,capability,machine,want", [
    ("AuthenticAMD", "AVX512", "x86_64", "onednn"),
    ("AuthenticAMD", "AVX2", "x86_64", "aten"),
    ("GenuineIntel", "AVX512", "x86_64", "aten"),
    ("", "AVX512", "x86_64", "aten"),
    ("AuthenticAMD", "AVX512", "aarch64", "aten"),
])
def test_auto_rule(monkeypatch, vendor, capability, machine, want):
    monkeypatch.setattr(cpu_gemm, "onednn_available", lambda: True)
    monkeypatch.setattr(cpu_gemm, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(cpu_gemm.platform, "machine", lambda: machine)
    assert cpu_gemm.auto_choice() == want
    monkeypatch.setattr(cpu_gemm, "onednn_available", lambda: False)
    assert cpu_gemm.auto_choice() == "aten"


def test_bad_environment_value_is_reported_by_current_not_at_import(monkeypatch):
    """alignfast.ops imports with a bad ALIGNFAST_CPU_GEMM (the command line's error report imports it too);
    the first `current()`, which the fast trainers call when built, raises the one-line error."""
    monkeypatch.setenv("ALIGNFAST_CPU_GEMM", "mkl")
    monkeypatch.setattr(cpu_gemm, "_state", {"applied": False})
    cpu_gemm.apply_environment()
    with pytest.raises(AlignfastArgumentError, match="'ALIGNFAST_CPU_GEMM' must be one of"):
        cpu_gemm.current()


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward of fn() (parameters included)."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def test_a_frozen_weight_keeps_no_activation_alive(library):
    """As F.linear: x is saved only for dW, W only for dx (LoRA's frozen base layers)."""
    x = torch.randn(64, 32, requires_grad=True)
    w_frozen, w_trained = torch.randn(16, 32), torch.randn(16, 32, requires_grad=True)
    assert saved_bytes(lambda: linear(x, w_frozen)) == w_frozen.numel() * 4
    assert saved_bytes(lambda: linear(x.detach(), w_trained)) == x.numel() * 4
    a, b = torch.randn(8, 4, requires_grad=True), torch.randn(4, 3)
    assert saved_bytes(lambda: op("mm")(a, b)) == b.numel() * 4


def test_route_leaves_autocast_to_f_linear(library):
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.linear(x, w)
        with RouteLinear():
            got = F.linear(x, w)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_route_takes_keyword_arguments(library, monkeypatch):
    calls = []
    original = _Linear.apply
    monkeypatch.setattr(_Linear, "apply", lambda *a: calls.append(1) or original(*a))
    x, w, b = torch.randn(5, 8), torch.randn(3, 8), torch.randn(3)
    with RouteLinear():
        got = [F.linear(input=x, weight=w), F.linear(x, weight=w, bias=b), F.linear(x, w, bias=b)]
    assert len(calls) == 3
    for y, want in zip(got, [F.linear(x, w), F.linear(x, w, b), F.linear(x, w, b)]):
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_mkldnn_switched_off_in_torch_means_aten():
    """64x576x64 rounds differently on the two libraries (checked first), so the equality says which one ran."""
    if not cpu_gemm.onednn_available():
        pytest.skip("oneDNN not reachable")
    a, b = torch.randn(64, 576), torch.randn(576, 64)
    with cpu_gemm.use("onednn"), cpu_gemm.smallest_gemm(0):
        if torch.equal(op("mm")(a, b), torch.mm(a, b)):
            pytest.skip("the two libraries agree bit for bit here: the check cannot tell them apart")
        with torch.backends.mkldnn.flags(enabled=False):
            assert torch.equal(op("mm")(a, b), torch.mm(a, b))


def test_an_explicit_choice_replaces_a_bad_environment_value(monkeypatch):
    monkeypatch.setenv("ALIGNFAST_CPU_GEMM", "mkl")
    monkeypatch.setattr(cpu_gemm, "_state", {"applied": False})
    before = cpu_gemm._ext.load().cpu_gemm_backend()
    cpu_gemm.apply_environment()
    try:
        cpu_gemm.set_backend("aten")
        assert cpu_gemm.current() == "aten"
    finally:
        cpu_gemm._ext.load().cpu_gemm_backend(before)


def test_hugging_face_checkpointing_is_not_routed(library, monkeypatch):
    """HF's non-reentrant checkpoint recomputes a layer in the backward, outside any block: route_linear(model)
    stays off while the model checkpoints in training mode (else torch raises CheckpointError)."""
    from alignfast.ops.linear import hf_checkpointing

    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert hf_checkpointing(model)
    with route_linear(model):
        model(input_ids=torch.randint(0, 97, (2, 7))).logits.square().mean().backward()
    model.eval()
    assert not hf_checkpointing(model)


def test_small_gemms_stay_on_aten(monkeypatch):
    """oneDNN's fixed cost per call loses below min_macs_per_thread x threads: such GEMMs run ATen's kernel (bit
    for bit torch.mm), and RouteLinear leaves such linears to F.linear. 64x576x64 is a shape whose result differs
    between the two libraries, so the bitwise check would fail if the rule were not applied."""
    if not cpu_gemm.onednn_available():
        pytest.skip("oneDNN not reachable")
    calls = []
    original = _Linear.apply
    monkeypatch.setattr(_Linear, "apply", lambda *a: calls.append(1) or original(*a))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        limit = 2 * cpu_gemm.min_macs_per_thread()
        small_a, small_b = torch.randn(64, 576), torch.randn(576, 64)
        assert 64 * 576 * 64 < limit <= 256 * 512 * 512
        with cpu_gemm.use("onednn"):
            with cpu_gemm.smallest_gemm(0):  # forced onto oneDNN, this shape rounds differently (on the CI's CPUs)
                if torch.equal(op("mm")(small_a, small_b), torch.mm(small_a, small_b)):
                    pytest.skip("the two libraries agree bit for bit here: the check cannot tell them apart")
            assert torch.equal(op("mm")(small_a, small_b), torch.mm(small_a, small_b))
            with RouteLinear():
                F.linear(small_a, small_b.t())
                assert not calls
                F.linear(torch.randn(256, 512), torch.randn(512, 512))
                assert len(calls) == 1
    finally:
        torch.set_num_threads(threads)


def test_a_huge_threshold_means_never():
    """The rule divides by the thread count: a threshold near 2^62 must not overflow into 'always'."""
    if not cpu_gemm.onednn_available():
        pytest.skip("oneDNN not reachable")
    a, b = torch.randn(64, 576), torch.randn(576, 64)
    with cpu_gemm.use("onednn"):
        with cpu_gemm.smallest_gemm(0):
            if torch.equal(op("mm")(a, b), torch.mm(a, b)):
                pytest.skip("the two libraries agree bit for bit here: the check cannot tell them apart")
        with cpu_gemm.smallest_gemm(1 << 62):
            assert torch.equal(op("mm")(a, b), torch.mm(a, b))
    with pytest.raises(AlignfastArgumentError, match="'per_thread'"):
        with cpu_gemm.smallest_gemm(-1):
            pass


def test_row_counts_reuse_a_fixed_set_of_onednn_shapes():
    """oneDNN compiles and keeps a primitive per GEMM shape (~1-3 MiB each with the heap it pins): routed linears
    over 200 token counts once grew a process by 2.2 GiB (bench/NOTES-gemm.md, "memory"). gemm_into gives oneDNN
    each product's first 8 token counts as they are, later ones for the rows of x W^T and dy W as one or two calls
    whose row counts lie on a grid of two sizes per octave (13 sizes from 16 to 1100), and for the summed tokens of
    dy^T x in blocks of 4096 ... 64 (7 sizes, the first written and the rest summed: 13 shapes). So 50 token counts
    add at most 3 x (8 + 13) shapes, where unblocked calls add 150."""
    import alignfast._C as C

    if not cpu_gemm.onednn_available():
        pytest.skip("oneDNN not reachable")
    weight = torch.randn(96, 80, requires_grad=True)
    with cpu_gemm.use("onednn"), cpu_gemm.smallest_gemm(0):
        before = C.onednn_shapes()
        for rows in range(64, 1100, 21):  # 50 counts, each a new shape for an unblocked GEMM
            x = torch.randn(rows, 80, requires_grad=True)
            linear(x, weight).square().sum().backward()
        added = C.onednn_shapes() - before
    # each product: the first 8 counts as they are; then x W^T and dy W the grid's 13 row counts, dy^T x K blocks
    assert 0 < added <= (8 + 13) + (8 + 13) + (8 + 13), added


def test_a_few_row_counts_go_as_they_are():
    """A run whose micro-batches come in a few sizes keeps one oneDNN call per GEMM: the first 8 distinct row
    counts of a shape family are admitted as they are (the grid's second call re-reads W: csrc/cpu/gemm.cpp)."""
    import alignfast._C as C

    if not cpu_gemm.onednn_available():
        pytest.skip("oneDNN not reachable")
    weight = torch.randn(72, 56)
    with cpu_gemm.use("onednn"), cpu_gemm.smallest_gemm(0):
        before = C.onednn_shapes()
        for rows in (100, 200, 100, 200, 100):  # off the grid, two counts: two shapes
            linear(torch.randn(rows, 56), weight)
        assert C.onednn_shapes() - before == 2
        with cpu_gemm.exact_row_counts(0):  # a new count on the grid: 40 = 32 + an overlapping 16
            got = linear(x := torch.randn(40, 56), weight)
        assert C.onednn_shapes() - before == 4
        torch.testing.assert_close(got, x @ weight.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(AlignfastArgumentError, match="'limit'"):
        with cpu_gemm.exact_row_counts(-1):
            pass
