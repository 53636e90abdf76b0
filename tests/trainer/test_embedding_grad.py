"""The critic's persistent embedding-gradient buffer (trainer/embedding_grad.py) gives nn.Embedding's
gradient bit for bit: one micro-batch, accumulated micro-batches, the steps after zero_grad(set_to_none=True)
(the rows touched before must be cleared), a gradient tensor it does not own, padding_idx, and no-grad
forwards. And it is installed only where nothing else uses the weight."""

import pytest
import torch
from torch import nn

from alignfast.trainer import embedding_grad
from alignfast.trainer.embedding_grad import (buffer_applies, install_embedding_grad_buffer, install_for_critic,
                                              remove_embedding_grad_buffer)


@pytest.fixture(autouse=True)
def any_size(monkeypatch):
    """The tests' embeddings are small; the size rule has its own test."""
    monkeypatch.setattr(embedding_grad, "MIN_GRADIENT_BYTES", 0)


def test_small_embeddings_keep_nn_embedding(monkeypatch):
    monkeypatch.setattr(embedding_grad, "MIN_GRADIENT_BYTES", 32 * 1024 * 1024)
    assert not buffer_applies(nn.Embedding(51, 64))
    assert buffer_applies(nn.Embedding(49152, 576))  # SmolLM2's: 113 MB


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
    held = buffered._alignfast_grad_buffer.buffer  # kept alive, so a new block cannot take its address
    assert held.data_ptr() in ptrs
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


class TiedLM(nn.Module):
    """Token embeddings tied to the LM head, as SmolLM2's: the weight gets the lookup's and the head's gradient."""

    def __init__(self, V, H, dtype, seed=0, tie=True):
        super().__init__()
        torch.manual_seed(seed)  # every module's initial weights
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(V, H, padding_idx=0).to(dtype)
        self.head = nn.Linear(H, V, bias=False).to(dtype)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(V, H, generator=g, dtype=dtype))
            self.head.weight.copy_(torch.randn(V, H, generator=g, dtype=dtype))
        if tie:
            self.head.weight = self.embed.weight
        self.mix = nn.Linear(H, H).to(dtype)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, idx, head=True):
        h = torch.tanh(self.mix(self.embed(idx)))
        return torch.log_softmax(self.head(h), -1).sum() if head else h.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tied_weight_in_place_lookup_gradient_is_bitwise(dtype):
    from alignfast.trainer.embedding_grad import install_for_policy

    V, H = 40, 12
    plain, fast = TiedLM(V, H, dtype), TiedLM(V, H, dtype)
    assert install_for_policy(fast, micro_batches_per_step=1) == "tied"
    from alignfast.trainer.embedding_grad import _TiedLookup

    fallbacks = _TiedLookup.dense_fallbacks
    for step in range(4):  # one micro-batch per optimizer step, with an update in between
        for m in (plain, fast):
            m.zero_grad(set_to_none=True)
        idx = draws(V, H, dtype, 1, seed=step)[0][0]
        plain(idx).backward()
        fast(idx).backward()
        for (name, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters()):
            assert torch.equal(a.grad, b.grad), (step, name)
        with torch.no_grad():
            for m in (plain, fast):
                for p in m.parameters():
                    p.sub_(0.01 * p.grad)
    # the head's dW landed first every time: no [V, H] block of zeros was made
    assert _TiedLookup.dense_fallbacks == fallbacks
    # a backward where only the lookup contributes: nn.Embedding's dense gradient
    for m in (plain, fast):
        m.zero_grad(set_to_none=True)
        m(draws(V, H, dtype, 1)[0][0], head=False).backward()
    assert torch.equal(fast.embed.weight.grad, plain.embed.weight.grad)
    assert remove_embedding_grad_buffer(fast.embed) and not remove_embedding_grad_buffer(fast.embed)


def test_policy_install_rules():
    from alignfast.trainer.embedding_grad import install_for_policy

    one = dict(micro_batches_per_step=1)
    assert install_for_policy(TiedLM(10, 4, torch.float32, tie=False), **one) == "buffer"
    assert install_for_policy(TiedLM(10, 4, torch.float32, tie=False), micro_batches_per_step=2) == "buffer"
    # tied, several micro-batches per step: the engine would add the head's part to the accumulated gradient first
    assert install_for_policy(TiedLM(10, 4, torch.float32), micro_batches_per_step=2) is None
    frozen = TiedLM(10, 4, torch.float32)
    frozen.embed.weight.requires_grad_(False)
    assert install_for_policy(frozen, **one) is None
    shared_thrice = TiedLM(10, 4, torch.float32)
    shared_thrice.extra = nn.Linear(4, 10, bias=False)
    shared_thrice.extra.weight = shared_thrice.embed.weight
    assert install_for_policy(shared_thrice, **one) is None


@pytest.mark.parametrize("value_head,accumulation", [("separate", 1), ("shared", 1), ("separate", 2)])
def test_trainer_runs_bit_for_bit_with_and_without_the_embedding_paths(tmp_path, monkeypatch, value_head,
                                                                       accumulation):
    """A tied-embedding prompter (full fine-tuning; the critic's copy of the backbone is then untied): the
    fast trainer gives the same losses and weights, bit for bit, with the buffered / in-place embedding
    gradients and the LM head's kept dW block (ops/weight_grad_buffer.py) as with nn.Embedding's own backward
    and a fresh dW per micro-batch."""
    import alignfast.trainer.base as base
    from alignfast.ops import weight_grad_buffer

    monkeypatch.setattr(weight_grad_buffer, "MIN_GRADIENT_BYTES", 0)
    from tests.trainer.tiny import WORDS, echo_trainer, make_causal_lm, make_tokenizer

    tok = make_tokenizer(tmp_path / "tok", WORDS)
    make_causal_lm(tmp_path / "prompter", len(tok), seed=0, hidden=16, layers=1, tie=True)
    tok.save_pretrained(str(tmp_path / "prompter"))
    cfg = dict(backend="fast", seed=2, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
               num_mini_batches=2, num_ppo_epochs=2, max_steps=2, response_length=5, temperature=0.9, kl_coef=0.1,
               learning_rate=3e-3, save_strategy="no", logging_steps=1, rewrite_template="rewrite {prompt}",
               value_head=value_head)

    def run(name):
        trainer, rec = echo_trainer(tok, tmp_path / "prompter", output_dir=str(tmp_path / name), **cfg)
        trainer.train()
        return trainer, rec

    from alignfast.trainer.embedding_grad import _TiedLookup

    fallbacks = _TiedLookup.dense_fallbacks
    fast, rf = run("with")
    assert fast.policy_embedding_grad == ("tied" if accumulation == 1 else None)
    assert _TiedLookup.dense_fallbacks == fallbacks  # the LM head's dW always landed first
    assert fast.embedding_grad_buffers == (1 if value_head == "separate" else 0)
    block = fast.head_grad_buffer
    # every optimizer step's first micro-batch writes into the block (max_steps x num_ppo_epochs x num_mini_batches
    # of them); a later one finds it free too unless the weight's gradient is still the block (with accumulation the
    # engine sums the untied lookup's gradient and dW into a new tensor first)
    steps = 2 * 2 * 2
    assert block.lent >= steps and block.lent + block.busy == steps * accumulation
    monkeypatch.setattr(base, "install_for_policy", lambda model, **kw: None)
    monkeypatch.setattr(base, "install_for_critic", lambda critic, other: 0)
    monkeypatch.setattr(weight_grad_buffer, "register_if_worth", lambda weight, owner=None: None)
    plain, rp = run("without")
    assert plain.policy_embedding_grad is None and plain.head_grad_buffer is None
    assert rf.losses == rp.losses
    for (name, a), (_, b) in zip(fast.model.named_parameters(), plain.model.named_parameters()):
        assert torch.equal(a, b), name
    if value_head == "separate":
        for (name, a), (_, b) in zip(fast.value_model.named_parameters(), plain.value_model.named_parameters()):
            assert torch.equal(a, b), name


def test_modules_with_the_lookups_pickle_and_deep_copy():
    import copy
    import pickle

    from alignfast.trainer.embedding_grad import install_for_policy

    _, buffered = pair(12, 4, torch.float32)
    tied = TiedLM(12, 4, torch.float32)
    install_for_policy(tied, micro_batches_per_step=1)
    idx = torch.tensor([[1, 2, 2, 5]])
    for m, embedding_of in ((buffered, lambda m: m), (tied, lambda m: m.embed)):
        for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
            out = clone(idx)
            assert torch.equal(out, m(idx))
            out.sum().backward()  # the copy's lookup writes its own weight's gradient, not the original's
            assert embedding_of(clone).weight.grad is not None and embedding_of(m).weight.grad is None
