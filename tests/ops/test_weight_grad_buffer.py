"""The LM head's kept gradient block (alignfast/ops/weight_grad_buffer.py): the fused log-prob op's backward
writes dW into it only when no tensor still uses it, and the gradient is bit for bit the fresh one's.

Covered: fp32 / fp64 / bf16 with a bias, a mask and entropy; steps after `grad = None`; accumulation (the
block is the gradient, so the next micro-batch gets a fresh dW); a caller holding an old gradient; a
weight whose shape changed; no valid row; the registry's life; the schema's out argument (opcheck and a bad
buffer)."""

from __future__ import annotations

import gc

import pytest
import torch

from alignfast.ops import linear_token_logprobs, weight_grad_buffer
from alignfast.ops._library import has_kernel, op

pytestmark = pytest.mark.skipif(not has_kernel("linear_token_logprobs", "cpu"),
                                reason="alignfast._C has no CPU kernel (extension not built)")


def head(V, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter((torch.randn(V, H, generator=g) / H ** 0.5).to(dtype))
    b = torch.nn.Parameter(torch.randn(V, generator=g).to(dtype))
    return w, b


def batch(V, H, dtype, seed, rows=(3, 7)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*rows, H, generator=g).to(dtype).requires_grad_()
    tokens = torch.randint(0, V, rows, generator=g)
    mask = torch.rand(rows, generator=g) > 0.3
    upstream = torch.randn(rows, generator=g)
    return hidden, tokens, mask, upstream


def backward(w, b, hidden, tokens, mask, upstream, chunk_size=None):
    lp, ent = linear_token_logprobs(hidden, w, tokens, bias=b, mask=mask, return_entropy=True,
                                    temperature=0.8, chunk_size=chunk_size)
    ((lp * upstream).sum() + 0.1 * ent.sum()).backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_bitwise_the_fresh_gradient_and_lent_every_step(dtype, chunk_size):
    V, H = 37, 8
    plain_w, plain_b = head(V, H, dtype)
    w, b = head(V, H, dtype)
    block = weight_grad_buffer.register(w)
    assert weight_grad_buffer.register(w) is block  # one block per weight
    for step in range(4):
        for p in (plain_w, plain_b, w, b):
            p.grad = None
        data = batch(V, H, dtype, seed=step)
        backward(plain_w, plain_b, *data, chunk_size=chunk_size)
        backward(w, b, *[t.detach().requires_grad_() if t.is_floating_point() and t.requires_grad else t
                         for t in data], chunk_size=chunk_size)
        assert torch.equal(w.grad, plain_w.grad), step
        assert torch.equal(b.grad, plain_b.grad), step
        assert w.grad.data_ptr() == block.storage.data_ptr()  # autograd kept the block as the gradient
    assert (block.lent, block.busy) == (4, 0)


def test_accumulation_gets_a_fresh_block_while_the_kept_one_is_the_gradient():
    V, H = 29, 6
    plain_w, _ = head(V, H, torch.float32)
    w, _ = head(V, H, torch.float32)
    block = weight_grad_buffer.register(w)
    for micro in range(3):
        data = batch(V, H, torch.float32, seed=micro)
        backward(plain_w, None, *data)
        backward(w, None, *data)
        assert torch.equal(w.grad, plain_w.grad), micro
    assert (block.lent, block.busy) == (1, 2)
    assert w.grad.data_ptr() == block.storage.data_ptr()


def test_a_gradient_someone_still_holds_is_never_overwritten():
    V, H = 23, 5
    w, _ = head(V, H, torch.float32)
    block = weight_grad_buffer.register(w)
    backward(w, None, *batch(V, H, torch.float32, seed=0))
    kept = w.grad
    snapshot = kept.clone()
    w.grad = None
    backward(w, None, *batch(V, H, torch.float32, seed=1))
    assert torch.equal(kept, snapshot) and w.grad.data_ptr() != block.storage.data_ptr()
    assert (block.lent, block.busy) == (1, 1)
    del kept
    w.grad = None
    backward(w, None, *batch(V, H, torch.float32, seed=2))
    assert w.grad.data_ptr() == block.storage.data_ptr() and block.lent == 2


def test_a_weight_of_another_shape_is_not_lent_the_block():
    w, _ = head(23, 5, torch.float32)
    block = weight_grad_buffer.register(w)
    with torch.no_grad():
        w.data = torch.randn(31, 5)
    backward(w, None, *batch(31, 5, torch.float32, seed=0))
    assert w.grad.shape == (31, 5) and block.lent == 0


def test_no_valid_row_gives_zeros_in_the_block():
    w, _ = head(11, 4, torch.float32)
    block = weight_grad_buffer.register(w)
    with torch.no_grad():
        block.storage.fill_(7.0)  # whatever an earlier step left there
    hidden, tokens, mask, upstream = batch(11, 4, torch.float32, seed=0)
    backward(w, None, hidden, tokens, torch.zeros_like(mask), upstream)
    assert block.lent == 1 and torch.equal(w.grad, torch.zeros_like(w))


def test_registry_follows_the_weight():
    w, _ = head(11, 4, torch.float32)
    weight_grad_buffer.register(w)
    assert weight_grad_buffer.buffer_of(w) is not None
    assert weight_grad_buffer.unregister(w) and not weight_grad_buffer.unregister(w)
    assert weight_grad_buffer.buffer_of(w) is None
    weight_grad_buffer.register(w)
    size = len(weight_grad_buffer._registry)
    del w
    gc.collect()
    assert len(weight_grad_buffer._registry) == size - 1
    # a copy is another weight: it has no block of its own
    w2, _ = head(11, 4, torch.float32)
    weight_grad_buffer.register(w2)
    import copy

    assert weight_grad_buffer.buffer_of(copy.deepcopy(w2)) is None


def test_worth_a_buffer_only_for_large_trained_cpu_weights():
    big = torch.nn.Parameter(torch.empty(49152, 576))  # SmolLM2's head: 113 MB
    assert weight_grad_buffer.worth_a_buffer(big)
    assert not weight_grad_buffer.worth_a_buffer(torch.nn.Parameter(torch.empty(51, 64)))
    assert not weight_grad_buffer.worth_a_buffer(big.detach())  # frozen
    assert weight_grad_buffer.register_if_worth(torch.nn.Parameter(torch.empty(51, 64))) is None


def test_schema_out_argument():
    V, H = 21, 8
    w, b = head(V, H, torch.float32)
    hidden, tokens, mask, _ = batch(V, H, torch.float32, seed=0, rows=(6,))
    h = hidden.detach()
    lp, ent, lse = op("linear_token_logprobs")(h, w.detach(), b.detach(), tokens, mask, 0.7, True, 4)
    g = torch.randn(6), torch.randn(6)
    out = torch.empty(V, H)
    quick = ("test_schema", "test_faketensor")
    torch.library.opcheck(op("linear_token_logprobs_backward"),
                          (*g, h, w.detach(), b.detach(), tokens, mask, lp, ent, lse, 0.7, 4, True, True, True, out),
                          test_utils=quick)
    dh, dw, db = op("linear_token_logprobs_backward")(*g, h, w.detach(), b.detach(), tokens, mask, lp, ent, lse,
                                                      0.7, 4, True, True, True, out)
    _, fresh, _ = op("linear_token_logprobs_backward")(*g, h, w.detach(), b.detach(), tokens, mask, lp, ent, lse,
                                                       0.7, 4, True, True, True)
    assert dw.numel() == 0 and torch.equal(out, fresh)
    with pytest.raises(RuntimeError, match="argument .weight_grad_out.: must be a contiguous Float \\[21, 8\\]"):
        op("linear_token_logprobs_backward")(*g, h, w.detach(), b.detach(), tokens, mask, lp, ent, lse, 0.7, 4,
                                             True, True, True, torch.empty(V, H + 1))


def test_a_kept_python_storage_object_keeps_the_block_busy():
    V, H = 23, 5
    w, _ = head(V, H, torch.float32)
    block = weight_grad_buffer.register(w)
    backward(w, None, *batch(V, H, torch.float32, seed=0))
    kept = w.grad.untyped_storage()  # the only thing left on the old gradient's memory
    snapshot = torch.empty(0).set_(kept).clone()
    w.grad = None
    backward(w, None, *batch(V, H, torch.float32, seed=1))
    assert torch.equal(torch.empty(0).set_(kept), snapshot) and (block.lent, block.busy) == (1, 1)


def test_two_threads_never_share_the_block():
    import threading

    V, H = 400, 16
    w, _ = head(V, H, torch.float32)
    plain = torch.nn.Parameter(w.detach().clone())
    block = weight_grad_buffer.register(w)
    data = [batch(V, H, torch.float32, seed=s, rows=(32,)) for s in range(2)]
    expected = []
    for hidden, tokens, mask, upstream in data:
        lp = linear_token_logprobs(hidden.detach(), plain, tokens, mask=mask)
        expected.append(torch.autograd.grad((lp * upstream).sum(), [plain])[0])
    results, start = [None, None], threading.Barrier(2)

    def run(i):
        hidden, tokens, mask, upstream = data[i]
        start.wait()
        for _ in range(30):
            lp = linear_token_logprobs(hidden.detach(), w, tokens, mask=mask)
            (got,) = torch.autograd.grad((lp * upstream).sum(), [w])
            if not torch.equal(got, expected[i]):
                results[i] = "different"
                return
            del got
        results[i] = "same"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["same", "same"] and block.lent + block.busy == 60


def test_the_block_goes_with_its_last_owner():
    class Trainer:
        pass

    w, _ = head(11, 4, torch.float32)
    first, second = Trainer(), Trainer()
    block = weight_grad_buffer.register(w, owner=first)
    assert weight_grad_buffer.register(w, owner=second) is block
    del first
    gc.collect()
    assert weight_grad_buffer.buffer_of(w) is block  # the second trainer still uses it
    del second
    gc.collect()
    assert weight_grad_buffer.buffer_of(w) is None
    backward(w, None, *batch(11, 4, torch.float32, seed=0))  # a fresh dW again
    assert block.lent == 0 and w.grad is not None


def test_a_block_registered_without_an_owner_stays():
    class Trainer:
        pass

    w, _ = head(11, 4, torch.float32)
    owner = Trainer()
    block = weight_grad_buffer.register(w, owner=owner)
    assert weight_grad_buffer.register(w) is block
    del owner
    gc.collect()
    assert weight_grad_buffer.buffer_of(w) is block
