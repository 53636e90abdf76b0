"""Left-padded batches under float64 eager attention (alignfast.rollout._pad_mask).

Before the fix, every family below gave NaN logits for the real tokens of a left-padded row under eager attention
in float64, at any pad width and with or without a sliding window: HFEngine's batched greedy output then differed
from per-prompt `generate` on every padded row, and the policy's log-probs, the value model, the trainer's
sampler and the Aligner's SFT loss were NaN or garbage on them. Each check compares a padded batch with the rows
run alone, pads from 1 to 12 tokens against a window of 4.
"""

from __future__ import annotations

import pytest
import torch

from alignfast.rollout import HFEngine
from alignfast.rollout._pad_mask import pad_safe_attention, unmask_dead_rows
from tests.rollout.engine_tiny_models import SLIDING_FAMILIES, build_family_model

# prompt lengths 2..14: left pads of 12, 11, 9 and 6 tokens in one batch, against a window of 4
PROMPT_LENGTHS = (2, 3, 5, 8, 14)


pytestmark = pytest.mark.usefixtures("one_thread")


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 64, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def alone(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Per-prompt greedy `generate` (no padding), EOS switched off as in the engine calls below."""
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def test_unmask_dead_rows_zeroes_only_fully_masked_rows():
    lo = torch.finfo(torch.float64).min
    mask = torch.tensor([[[[lo, lo, lo], [lo, 0.0, lo], [lo, 0.0, 0.0]]]], dtype=torch.float64)
    got = unmask_dead_rows(mask)
    assert got[0, 0, 0].tolist() == [0.0, 0.0, 0.0]  # a pad's row: attends to every key
    assert torch.equal(got[0, 0, 1:], mask[0, 0, 1:])  # rows that see a key are returned as built
    boolean = torch.tensor([[[[False, False], [True, False]]]])
    assert unmask_dead_rows(boolean) is boolean  # sdpa's boolean masks are left alone
    assert unmask_dead_rows(None) is None
    live = mask[:, :, 1:]
    assert unmask_dead_rows(live) is live  # no dead row: no copy
    copy = mask.clone()
    assert unmask_dead_rows(copy, in_place=True) is copy and torch.equal(copy, got)


def test_pad_safe_attention_installs_once_and_restores_the_builder():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as functions

    before = functions["eager"]
    with pad_safe_attention():
        wrapped = functions["eager"]
        assert wrapped is not before
        with pad_safe_attention():  # nested (a policy forward inside a sampled rollout): one wrapper, not two
            assert functions["eager"] is wrapped
        assert functions["eager"] is wrapped
        assert functions["sdpa"] is not wrapped
    assert functions["eager"] is before


def test_pad_safe_attention_keeps_a_local_override():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as functions

    original = functions["eager"]

    def custom(*args, **kwargs):
        return original(*args, **kwargs)

    functions["eager"] = custom
    try:
        with pad_safe_attention():
            assert functions["eager"] is not custom
        assert functions["eager"] is custom
    finally:
        del functions["eager"]
    assert functions["eager"] is original


def test_pad_safe_attention_leaves_a_class_wide_registration_made_inside_the_block():
    """AttentionMaskInterface.register while a block is open (another thread, a library import): after the block
    the new class-wide builder shows through, not a local copy of the builder found at install."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as functions
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    def mine(*args, **kwargs):
        return eager_mask(*args, **kwargs)

    assert "eager" not in functions._local_mapping
    try:
        with pad_safe_attention():
            AttentionMaskInterface.register("eager", mine)
        assert functions["eager"] is mine
        assert "eager" not in functions._local_mapping
    finally:
        AttentionMaskInterface.register("eager", eager_mask)
        functions._local_mapping.pop("eager", None)


def test_pad_safe_attention_leaves_a_local_entry_set_inside_the_block():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as functions

    original = functions["eager"]

    def mine(*args, **kwargs):
        return original(*args, **kwargs)

    try:
        with pad_safe_attention():
            with pad_safe_attention():
                functions["eager"] = mine  # replaces our wrapper: theirs from now on
            assert functions["eager"] is mine
        assert functions["eager"] is mine
    finally:
        functions._local_mapping.pop("eager", None)
    assert functions["eager"] is original


def test_pad_safe_attention_leaves_a_replacement_of_a_prior_local_override():
    """A local override before the block, replaced by another inside it: the replacement stays (the prior one
    is not put back over it), and a class-wide registration inside the block does not disturb the prior one."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as functions
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    def first(*args, **kwargs):
        return eager_mask(*args, **kwargs)

    def second(*args, **kwargs):
        return eager_mask(*args, **kwargs)

    try:
        functions["eager"] = first
        with pad_safe_attention():
            assert functions["eager"]._alignfast_wrapped is first
            functions["eager"] = second
        assert functions["eager"] is second
        functions["eager"] = first
        with pad_safe_attention():
            AttentionMaskInterface.register("eager", second)
        assert functions._local_mapping["eager"] is first and functions["eager"] is first
    finally:
        AttentionMaskInterface.register("eager", eager_mask)
        functions._local_mapping.pop("eager", None)
    assert functions["eager"] is eager_mask


@pytest.mark.parametrize("family", sorted(SLIDING_FAMILIES))
def test_engine_wide_left_pad_matches_per_prompt_generate(family):
    model = build_family_model(family)
    assert model.config._attn_implementation == "eager"
    want = [alone(model, p, 8) for p in prompts()]
    # the default layout (one batch) and the DynamicCache fallback with one prefill per batch
    for packed in (True, False):
        got = HFEngine(model, eos_token_id=[], packed_cache=packed).generate(prompts(), max_new_tokens=8)
        assert [r[0].token_ids for r in got] == want


def test_engine_sdpa_unchanged_by_the_fix():
    """sdpa never gave NaN (it handles fully masked rows itself); its masks are not wrapped."""
    model = build_family_model("mistral", attn_implementation="sdpa")
    got = HFEngine(model, eos_token_id=[]).generate(prompts(), max_new_tokens=8)
    assert [r[0].token_ids for r in got] == [alone(model, p, 8) for p in prompts()]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_policy_value_and_sampler_padded_rows_equal_rows_alone(family):
    from alignfast.trainer.policy import CausalLMPolicy, ValueModel
    from alignfast.trainer.sampling import left_pad, sample

    model = build_family_model(family)
    rows = prompts()[:4]
    q_ids, q_mask = left_pad(rows, 0)
    r_ids = torch.randint(3, 64, (len(rows), 3), generator=torch.Generator().manual_seed(1))
    r_mask = torch.ones_like(r_ids, dtype=torch.bool)
    value = ValueModel.from_causal_lm(model)
    value.head.weight.data.normal_(generator=torch.Generator().manual_seed(2))  # from_causal_lm starts at zero
    batch = {backend: CausalLMPolicy(model, backend=backend).forward(q_ids, q_mask, r_ids, r_mask,
                                                                      temperature=1.0).logprobs
             for backend in ("reference", "fast")}
    values = value(q_ids, q_mask, r_ids, r_mask)
    sampled = sample(model, q_ids, q_mask, max_new_tokens=4, stop_ids=[2], pad_id=0, temperature=0.0)
    for i, row in enumerate(rows):
        q1, m1 = left_pad([row], 0)
        for backend, logprobs in batch.items():
            single = CausalLMPolicy(model, backend=backend).forward(q1, m1, r_ids[i:i + 1], r_mask[i:i + 1],
                                                                    temperature=1.0).logprobs
            torch.testing.assert_close(logprobs[i:i + 1], single, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(values[i:i + 1], value(q1, m1, r_ids[i:i + 1], r_mask[i:i + 1]),
                                   rtol=1e-6, atol=1e-6)
        one = sample(model, q1, m1, max_new_tokens=4, stop_ids=[2], pad_id=0, temperature=0.0)
        assert sampled.response_ids[i].tolist() == one.response_ids[0].tolist()


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: soft-capped logits, the fast path's fallback
def test_aligner_loss_of_a_left_padded_batch_equals_its_rows_alone(family, backend):
    """The Aligner's SFT loss on collate's [prompt (left-padded) | target] batch: the summed NLL and its gradients
    equal the sums over the rows run alone (before the fix the batch gave NaN)."""
    from alignfast.aligner.data import EncodedRow, collate
    from alignfast.aligner.loss import CorrectionLoss

    model = build_family_model(family).requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    rows = [EncodedRow(p, torch.randint(3, 64, (n,), generator=g).tolist() + [2])
            for p, n in zip(prompts(), (3, 1, 4, 2, 5))]
    loss = CorrectionLoss(model, backend=backend)

    def nll_and_grads(batch):
        model.zero_grad(set_to_none=True)
        nll = loss.nll_sum(batch)
        nll.backward()
        return nll.detach(), [p.grad.clone() for p in model.parameters()]

    batched, batched_grads = nll_and_grads(collate(rows, 0))
    alone = [nll_and_grads(collate([row], 0)) for row in rows]
    assert batched.dtype == torch.float64 and torch.isfinite(batched)
    # eager attention takes its softmax in float32 even in a float64 model: a wider (padded) row rounds its sum
    # differently, ~1e-8 relative here (sdpa in float64 gives the same sums to 1e-15)
    torch.testing.assert_close(batched, sum(nll for nll, _ in alone), rtol=1e-6, atol=0.0)
    for i, grad in enumerate(batched_grads):
        want = sum(grads[i] for _, grads in alone)
        assert torch.isfinite(grad).all()
        assert (grad - want).norm() <= 1e-5 * want.norm(), (i, float((grad - want).norm() / want.norm()))


def test_proxy_decoder_accept_all_matches_per_prompt_generate():
    from alignfast.rollout.proxy_decoder import ProxyDecoder

    model = build_family_model("gemma2")

    def accept_all(features, proposals):
        return torch.full((proposals.numel(),), 50.0), None

    decoder = ProxyDecoder(model, eos_ids=[], pad_id=0, max_new_tokens=6, temperature=0.0)
    got = decoder.decode(prompts(), accept_all, seed=0).tokens
    assert got == [alone(model, p, 6) for p in prompts()]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_fix_changes_nothing_where_pads_were_finite(family, monkeypatch):
    """float32 eager never gave NaN: there the wrapper must leave log-probs, gradients and tokens bit for bit."""
    import alignfast.rollout._pad_mask as pad_mask
    from alignfast.trainer.policy import CausalLMPolicy
    from alignfast.trainer.sampling import left_pad

    model = build_family_model(family, dtype=torch.float32).requires_grad_(True)
    rows = prompts()[:4]
    q_ids, q_mask = left_pad(rows, 0)
    r_ids = torch.randint(3, 64, (len(rows), 4), generator=torch.Generator().manual_seed(1))
    r_mask = torch.ones_like(r_ids, dtype=torch.bool)

    def run():
        model.zero_grad(set_to_none=True)
        logprobs = CausalLMPolicy(model, backend="reference").forward(q_ids, q_mask, r_ids, r_mask,
                                                                       temperature=1.0).logprobs
        logprobs.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        tokens = [r[0].token_ids for r in HFEngine(model, eos_token_id=[]).generate(rows, max_new_tokens=6)]
        return logprobs.detach(), grads, tokens

    fixed = run()
    monkeypatch.setattr(pad_mask, "_install", lambda: None)
    plain = run()
    assert torch.equal(fixed[0], plain[0])
    assert all(torch.equal(a, b) for a, b in zip(fixed[1], plain[1]))
    assert fixed[2] == plain[2]
