"""The policy sampler: greedy equals transformers' generate, its log-probs equal a full forward pass,
stop tokens end rows, top-k / top-p filter as documented, and a seed fixes the draw."""

import pytest
import torch

from alignfast.trainer.sampling import filter_logits, left_pad, sample
from tests.trainer.tiny import make_causal_lm

V, EOS, PAD = 20, 2, 0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_causal_lm(tmp_path_factory.mktemp("sampler") / "m", V, seed=1, hidden=16, layers=2,
                          initializer_range=0.2)


def queries():
    rows = [[1, 7, 8, 9, 10], [1, 11], [1, 12, 13, 6], [5]]  # left padding of 0..4 tokens
    return left_pad(rows, PAD)


def test_greedy_matches_transformers_generate(model):
    ids, mask = queries()
    out = sample(model, ids, mask, max_new_tokens=6, stop_ids=[EOS], pad_id=PAD, temperature=0.0)
    ref = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=6, do_sample=False,
                         eos_token_id=EOS, pad_token_id=PAD)[:, ids.size(1):]
    for row, (got, m, want) in enumerate(zip(out.response_ids, out.response_mask, ref)):
        n = int(m.sum())
        assert got[:n].tolist() == want[:n].tolist(), row


def test_sampler_logprobs_equal_a_full_forward(model):
    ids, mask = queries()
    g = torch.Generator().manual_seed(0)

    def logprob_fn(logits, tokens, temperature):
        return torch.log_softmax(logits / temperature, -1).gather(-1, tokens[:, None]).squeeze(-1)

    out = sample(model, ids, mask, max_new_tokens=7, stop_ids=[EOS], pad_id=PAD, temperature=0.8, generator=g,
                 logprob_fn=logprob_fn)
    full_ids = torch.cat([ids, out.response_ids], 1)
    attn = torch.cat([mask, out.response_mask], 1).long()
    pos = (attn.cumsum(1) - 1).clamp_min(0)
    Q, R = ids.size(1), out.response_ids.size(1)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=attn, position_ids=pos).logits[:, Q - 1: Q - 1 + R]
    want = torch.log_softmax(logits.float() / 0.8, -1).gather(-1, out.response_ids[..., None]).squeeze(-1)
    m = out.response_mask
    # float32: the KV-cached and the full forward differ only in summation order.
    torch.testing.assert_close(out.logprobs[m], want[m], rtol=1e-5, atol=1e-5)
    assert (out.logprobs[~m] == 0).all()


def test_sampler_values_equal_a_full_forward(model):
    """A value head on the policy's backbone, read off the decode's last hidden state, gives the values a
    full forward gives: the trainer's fast path takes a shared head's old values from the sampler."""
    ids, mask = queries()
    torch.manual_seed(3)
    head = torch.nn.Linear(16, 1)

    def value_fn(hidden):
        return head(hidden).squeeze(-1)

    out = sample(model, ids, mask, max_new_tokens=7, stop_ids=[EOS], pad_id=PAD, temperature=0.8,
                 generator=torch.Generator().manual_seed(0), value_fn=value_fn)
    full_ids = torch.cat([ids, out.response_ids], 1)
    attn = torch.cat([mask, out.response_mask], 1).long()
    pos = (attn.cumsum(1) - 1).clamp_min(0)
    Q, R = ids.size(1), out.response_ids.size(1)
    with torch.no_grad():
        hidden = model.model(input_ids=full_ids, attention_mask=attn, position_ids=pos).last_hidden_state
        want = head(hidden[:, Q - 1: Q - 1 + R]).squeeze(-1)
    m = out.response_mask
    assert out.logprobs is None and out.values.dtype == torch.float32
    torch.testing.assert_close(out.values[m], want[m], rtol=1e-5, atol=1e-5)
    assert (out.values[~m] == 0).all()


def test_stop_tokens_end_rows_and_mask_the_rest(model):
    ids, mask = queries()
    out = sample(model, ids, mask, max_new_tokens=12, stop_ids=list(range(V // 2)), pad_id=PAD, temperature=1.0,
                 generator=torch.Generator().manual_seed(3))
    for row, m, ended in zip(out.response_ids.tolist(), out.response_mask.tolist(), out.ended.tolist()):
        n = sum(m)
        assert m == [True] * n + [False] * (len(m) - n)
        assert all(t == PAD for t in row[n:])
        assert ended == (row[n - 1] < V // 2)
        assert all(t >= V // 2 for t in row[: n - 1])


def test_seed_fixes_the_draw(model):
    ids, mask = queries()

    def draw(seed):
        return sample(model, ids, mask, max_new_tokens=8, stop_ids=[EOS], pad_id=PAD, temperature=1.5,
                      generator=torch.Generator().manual_seed(seed)).response_ids

    assert torch.equal(draw(4), draw(4))
    assert not torch.equal(draw(4), draw(5))


def test_top_k_and_top_p_filters():
    z = torch.tensor([[2.0, 1.0, 0.5, -1.0, float("-inf")]])
    assert torch.isinf(filter_logits(z, 2, 1.0)[0, 2:]).all() and torch.isfinite(filter_logits(z, 2, 1.0)[0, :2]).all()
    p = torch.softmax(z, -1)[0]
    # top_p keeps the smallest prefix (by probability) whose mass reaches top_p.
    kept = torch.isfinite(filter_logits(z, 0, float(p[0] + 0.01)))[0]
    assert kept.tolist() == [True, True, False, False, False]
    assert torch.isfinite(filter_logits(z, 0, float(p[0])))[0].tolist() == [True, False, False, False, False]
    assert torch.equal(filter_logits(z, 0, 1.0), z)


def test_top_k_one_is_greedy(model):
    ids, mask = queries()
    greedy = sample(model, ids, mask, max_new_tokens=5, stop_ids=[EOS], pad_id=PAD, temperature=0.0)
    topk1 = sample(model, ids, mask, max_new_tokens=5, stop_ids=[EOS], pad_id=PAD, temperature=2.0, top_k=1,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.response_ids, topk1.response_ids)
