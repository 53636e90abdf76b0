"""The critic's persistent embedding-gradient buffer (trainer/embedding_grad.py) gives nn.Embedding's
gradient bit for bit: one micro-batch, accumulated micro-batches, the steps after zero_grad(set_to_none=True)
(the rows touched before must be cleared), a gradient tensor it does not own, padding_idx, and no-grad
forwards. And it is installed only where nothing else uses the weight."""

import pytest
import torch
from torch import nn

from alignfast.trainer.embedding_grad import (buffer_applies, install_embedding_grad_buffer, install_for_critic,
                                              remove_embedding_grad_buffer)


def pair(V, H, dtype, padding_idx=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=g, dtype=dtype)
    plain, buffered = nn.Embedding(V, H, padding_idx=padding_idx), nn.Embedding(V, H, padding_idx=padding_idx)
    with torch.no_grad():
        plain.weight.copy_(w)
        buffered.weight.copy_(w)
    plain.to(dtype), buffered.to(dtype)
    install_embedding_grad_buffer(buffered)
    return plain, buffered


def lookup_backward(module, idx, upstream):
    out = module(idx)
    (out * upstream).sum().backward()
    return out


def draws(V, H, dtype, steps, shape=(3, 17), seed=1):
    g = torch.Generator().manual_seed(seed)
    # few distinct tokens: every row is hit several times, so the summation order matters
    return [(torch.randint(0, min(V, 9), shape, generator=g), torch.randn(*shape, H, generator=g, dtype=dtype))
            for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_bitwise_over_steps_and_accumulation(dtype, padding_idx):
    V, H = 50, 24
    plain, buffered = pair(V, H, dtype, padding_idx)
    for step, micro in enumerate([1, 2, 3, 1]):  # optimizer steps with 1-3 accumulated micro-batches
        plain.weight.grad = None
        buffered.weight.grad = None
        for idx, up in draws(V, H, dtype, micro, seed=10 * step + micro):
            a = lookup_backward(plain, idx, up)
            b = lookup_backward(buffered, idx, up)
            assert torch.equal(a, b)
        assert torch.equal(buffered.weight.grad, plain.weight.grad), f"step {step}"
        if padding_idx is not None:
            assert not buffered.weight.grad[padding_idx].any()
        # what the optimizer does between steps: the clip multiplies in place, the update moves the weight
        with torch.no_grad():
            for m in (plain, buffered):
                m.weight.grad.mul_(0.5)
                m.weight.sub_(0.1 * m.weight.grad)
        assert torch.equal(buffered.weight, plain.weight)


def test_a_gradient_it_does_not_own_gets_the_dense_add():
    V, H = 30, 8
    plain, buffered = pair(V, H, torch.float64)
    start = torch.randn(V, H, dtype=torch.float64)
    plain.weight.grad = start.clone()
    buffered.weight.grad = start.clone()
    for idx, up in draws(V, H, torch.float64, 2):
        lookup_backward(plain, idx, up)
        lookup_backward(buffered, idx, up)
    assert torch.equal(buffered.weight.grad, plain.weight.grad)


def test_zero_grad_without_set_to_none_and_no_grad_forward():
    V, H = 20, 4
    plain, buffered = pair(V, H, torch.float32)
    (idx, up), (idx2, up2) = draws(V, H, torch.float32, 2)
    for m in (plain, buffered):
        lookup_backward(m, idx, up)
        m.weight.grad.zero_()  # the buffer itself becomes the zeroed gradient
        lookup_backward(m, idx2, up2)
    assert torch.equal(buffered.weight.grad, plain.weight.grad)
    with torch.no_grad():
        out = buffered(idx)
    assert not out.requires_grad and torch.equal(out, plain(idx).detach())


def test_buffer_is_reused_and_removable():
    plain, buffered = pair(40, 8, torch.float32)
    ptrs = set()
    for idx, up in draws(40, 8, torch.float32, 3):
        buffered.weight.grad = None
        lookup_backward(buffered, idx, up)
        ptrs.add(buffered.weight.grad.data_ptr())
    assert len(ptrs) == 1  # one allocation for every step
    assert remove_embedding_grad_buffer(buffered) and not remove_embedding_grad_buffer(buffered)
    buffered.weight.grad = None
    lookup_backward(buffered, *draws(40, 8, torch.float32, 1)[0])
    assert buffered.weight.grad.data_ptr() not in ptrs  # nn.Embedding's own backward again


def test_installed_only_where_nothing_else_uses_the_weight():
    class Critic(nn.Module):
        def __init__(self, tie):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            if tie:
                self.head.weight = self.embed.weight

    assert install_for_critic(Critic(tie=False), []) == 1
    assert install_for_critic(Critic(tie=True), []) == 0  # autograd sums the two uses before accumulating
    shared = Critic(tie=False)
    assert install_for_critic(shared, [shared.embed.weight]) == 0  # the policy's weight too
    frozen = Critic(tie=False)
    frozen.embed.weight.requires_grad_(False)
    assert install_for_critic(frozen, []) == 0
    assert not buffer_applies(nn.Embedding(10, 4, max_norm=1.0))
    assert not buffer_applies(nn.Embedding(10, 4, scale_grad_by_freq=True))
    assert not buffer_applies(nn.Embedding(10, 4, sparse=True))
