"""ProxyDecoder on the toy world's frozen target: what the decoding loop must guarantee.

  * a proxy that always accepts reproduces the HF engine's own samples under the same seed (and its
    greedy answers);
  * a proxy that rejects a known token set never lets one through (while the bound is not reached);
  * at the rejection bound the most likely remaining token is forced, and no decision is recorded for it;
  * decisions are recorded left-aligned with the proxy's features, and rows are independent of the batch,
    including the batches cut by the token budget.
"""

from __future__ import annotations

import pytest
import torch

from alignfast.rollout import HFEngine
from alignfast.rollout.proxy_decoder import ProxyDecoder
from alignfast.rollout.templates import user_turn_ids


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignfast.toy import load_world

    world = load_world()
    tok = AutoTokenizer.from_pretrained(world.target_path)
    model = AutoModelForCausalLM.from_pretrained(world.target_path).eval().requires_grad_(False)
    prompts = [user_turn_ids(tok, r["prompt"]) for r in world.eval_prompts[:12]]
    prompts.append(prompts[0])  # a duplicate prompt: its own random stream, as in the engine
    return model, tok, prompts


def decoder(model, tok, **kw):
    args = dict(eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, max_new_tokens=8, max_rejections_per_token=3,
                temperature=1.0)
    args.update(kw)
    return ProxyDecoder(model, **args)


def accept_all(features, proposals):
    return torch.full((proposals.numel(),), 50.0), None


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_always_accept_is_the_targets_own_sampling(toy, temperature):
    model, tok, prompts = toy
    engine = HFEngine(model, tok)
    want = [c[0].token_ids for c in engine.generate(prompts, max_new_tokens=8, temperature=temperature, seed=123)]
    res = decoder(model, tok, temperature=temperature).decode(prompts, accept_all, seed=123)
    assert res.tokens == want
    assert int(res.rejections.sum()) == 0
    assert bool(res.actions[res.mask].eq(1).all())


def test_rejected_tokens_never_appear(toy):
    model, tok, prompts = toy
    banned = torch.tensor([tok.convert_tokens_to_ids(w) for w in ("1", "4", "8")])

    def judge(features, proposals):
        return torch.where(torch.isin(proposals, banned), -50.0, 50.0), None

    res = decoder(model, tok, max_rejections_per_token=4).decode(prompts, judge, seed=7)
    produced = {t for row in res.tokens for t in row}
    assert not produced & set(banned.tolist())
    assert int(res.rejections.sum()) > 0  # the target did propose them
    rejected = res.actions[res.mask] == 0
    assert bool(torch.isin(res.proposals[res.mask][rejected], banned).all())


def test_bound_forces_the_best_remaining_token(toy):
    model, tok, prompts = toy

    def reject_all(features, proposals):
        return torch.full((proposals.numel(),), -50.0), torch.zeros(proposals.numel())

    K = 2
    res = decoder(model, tok, max_rejections_per_token=K, temperature=0.0).decode(prompts, reject_all, seed=0)
    n_tokens = sum(len(r) for r in res.tokens)
    # greedy proposals: the 1st and 2nd most likely tokens are rejected, the 3rd is forced
    assert int(res.rejections.sum()) == K * n_tokens
    assert int(res.forced.sum()) == n_tokens
    assert int(res.mask.sum()) == K * n_tokens
    # the first forced token of every row is the third most likely first token of the target
    out = model(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    assert res.tokens[0][0] == int(out.topk(3).indices[2])


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_the_bound_token_is_from_the_nucleus_the_proposals_came_from(toy, temperature):
    """With top_p < 1 the proposals come from the nucleus at the target temperature. The bound's temperature-0 call
    took the nucleus at tau = 1 instead: above 1 that is a strict subset the rejections can exhaust (the decoder
    raised "ran out of allowed tokens"), below 1 a superset (the forced token could lie outside the nucleus)."""
    import copy

    from alignfast.reference.proposal import nucleus

    model, tok, prompts = toy
    flat = copy.deepcopy(model)
    with torch.no_grad():
        flat.get_output_embeddings().weight.mul_(0.25)  # a flatter target: a wider nucleus to reject from

    def reject_all(features, proposals):
        return torch.full((proposals.numel(),), -50.0), None

    K = 2
    res = decoder(flat, tok, max_rejections_per_token=K, temperature=temperature, top_p=0.5).decode(
        prompts, reject_all, seed=0)
    first = flat(input_ids=torch.tensor([prompts[0]])).logits[0, -1:].double()
    inside = nucleus(first, temperature=temperature, top_p=0.5)[0]
    rejected = res.proposals[0][:int(res.rejections[0] and K)].tolist()
    forced = res.tokens[0][0]
    assert bool(inside[forced]) and forced not in rejected
    remaining = first[0].masked_fill(~inside, float("-inf"))
    remaining[rejected] = float("-inf")
    assert forced == int(remaining.argmax())


def test_decisions_and_features(toy):
    model, tok, prompts = toy
    seen = []

    def judge(features, proposals):
        seen.append(features.clone())
        return torch.zeros(proposals.numel()), torch.arange(proposals.numel(), dtype=torch.float32)

    dec = decoder(model, tok)
    res = dec.decode(prompts[:4], judge, seed=3)
    R, D, F = res.features.shape
    assert F == dec.feature_size == model.config.hidden_size * 2 + 1
    # left-aligned: a row's decisions are a prefix of its columns
    m = res.mask.long()
    assert bool((m[:, 1:] <= m[:, :-1]).all())
    # the recorded action log-probs are those of Bernoulli(sigmoid(0)) = log 1/2
    assert torch.allclose(res.logprobs[res.mask], torch.full_like(res.logprobs[res.mask], -0.6931471805599453))
    # the last feature is the target's own log-prob of the proposal
    assert bool((res.features[res.mask][:, -1] <= 0).all())
    # a row decodes the same alone as in the batch
    alone = dec.decode(prompts[2:3], judge, seed=3)
    assert alone.tokens[0] == res.tokens[2]


def test_bad_arguments(toy):
    model, tok, _ = toy
    with pytest.raises(ValueError, match="max_rejections_per_token"):
        decoder(model, tok, max_rejections_per_token=0)
    with pytest.raises(ValueError, match="top_p"):
        decoder(model, tok, top_p=0.0)
    with pytest.raises(ValueError, match="prompt_ids"):
        decoder(model, tok).decode([[]], accept_all, seed=0)


def test_decoding_passes_the_cache_under_its_current_name(toy):
    """transformers 5 renamed `past_key_values` to `cache` and warns on the old keyword at every forward (the demo
    printed it from this decoder); both the backbone+head and the whole-model paths use the current name."""
    import warnings

    from alignfast.rollout._cache_api import cache_keyword

    model, tok, prompts = toy
    if cache_keyword(model) != "cache":
        pytest.skip("transformers < 5 has only past_key_values")
    dec = decoder(model, tok)
    for head in (dec._head, None):  # None: the whole model's forward (output_hidden_states)
        dec._head = head
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dec.decode(prompts[:2], accept_all, seed=1)
        assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]


def test_batches_cut_by_the_token_budget_decode_what_one_batch_decodes(toy):
    """Rows split over batches (longest prompts first, within a KV-cache token budget and a row cap) decode
    the tokens and decisions the single batch decodes, each in its own row: every draw is keyed by the row."""
    model, tok, prompts = toy

    def judge(features, proposals):  # rejects some proposals, from the features, so decisions vary by row
        return 40.0 * torch.tanh(features[:, 0] * 50.0), features[:, 1]

    whole = decoder(model, tok, max_rejections_per_token=2).decode(prompts, judge, seed=11)
    budget = (max(len(p) for p in prompts) + 8) * 3  # three rows of the longest prompt
    split_dec = decoder(model, tok, max_rejections_per_token=2, max_batch_tokens=budget, max_batch_size=4)
    cut = split_dec.batches(prompts)
    assert len(cut) >= 4 and sorted(i for b in cut for i in b) == list(range(len(prompts)))
    assert all(len(b) <= 4 and len(b) * (max(len(prompts[i]) for i in b) + 8) <= budget for b in cut)
    split = split_dec.decode(prompts, judge, seed=11)
    assert split.tokens == whole.tokens
    assert int(whole.rejections.sum()) > 0 and torch.equal(split.rejections, whole.rejections)
    for name in ("mask", "actions", "proposals", "forced", "ended"):
        assert torch.equal(getattr(split, name), getattr(whole, name)), name
    for name in ("features", "logprobs", "values"):
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), rtol=1e-5, atol=1e-5)


def test_by_default_a_cpu_call_is_one_batch_in_call_order_and_limits_are_checked(toy):
    model, tok, prompts = toy
    dec = decoder(model, tok)
    assert dec.batches(prompts) == [list(range(len(prompts)))]  # CPU default: 32768 positions, no row cap
    with pytest.raises(ValueError, match="max_batch_tokens"):
        decoder(model, tok, max_batch_tokens=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        decoder(model, tok, max_batch_size=1.5)


def test_a_share_of_the_rows_decodes_what_the_whole_call_gives_those_rows(toy):
    """rows=(lo, hi): one process's share under N processes; duplicates keep their whole-call streams."""
    model, tok, prompts = toy
    dec = decoder(model, tok, max_rejections_per_token=2)

    def judge(features, proposals):
        return 40.0 * torch.tanh(features[:, 0] * 50.0), features[:, 1]

    whole = dec.decode(prompts, judge, seed=5)
    lo, hi = 6, len(prompts)  # the last row duplicates row 0: its stream is the second occurrence's
    share = dec.decode(prompts, judge, seed=5, rows=(lo, hi))
    assert share.tokens == whole.tokens[lo:hi]
    assert torch.equal(share.rejections, whole.rejections[lo:hi]) and int(whole.rejections[lo:hi].sum()) > 0
    with pytest.raises(ValueError, match="rows"):
        dec.decode(prompts, judge, seed=5, rows=(3, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature,top_p,step", [(1.0, 1.0, 0), (1.0, 0.9, 1), (0.0, 1.0, 1)])
def test_non_finite_target_logits_name_the_targets_dtype(toy, bad, temperature, top_p, step):
    """A NaN or +inf logit from the target (a float16 forward overflowing) made propose_token return -1 and the
    decoder say it "ran out of allowed tokens"; greedy proposals went on with a NaN feature for the proxy. The
    error now says the target's logits are not finite at that step and which setting to change."""
    from alignfast.cli.errors import known_error_line
    from alignfast.ops._checks import AlignfastArgumentError

    model, tok, prompts = toy
    dec = decoder(model, tok, temperature=temperature, top_p=top_p)
    forward, calls = dec._forward, []

    def broken_forward(*args):
        logits, hidden = forward(*args)
        if len(calls) == step:  # forward `step` gives the logits of new token step + 1
            logits = logits.clone()
            logits[1, 7] = bad
        calls.append(1)
        return logits, hidden

    dec._forward = broken_forward
    with pytest.raises(AlignfastArgumentError) as err:
        dec.decode(prompts[:3], accept_all, seed=5)
    message = str(err.value)
    assert message.startswith("alignfast: the frozen target's logits are not finite (NaN or +inf) at new token "
                              f"{step + 1} (1 prompt(s))")
    assert "the target runs in float32; the usual cause is a float16 target overflowing" in message
    assert "target.dtype in the run file" in message
    assert "\n" not in message and "ran out of allowed tokens" not in message
    assert known_error_line(err.value) is not None  # the command line prints it as one line, no traceback


def test_a_float16_target_is_named_as_the_cause(toy):
    from alignfast.ops._checks import AlignfastArgumentError

    model, tok, _ = toy
    dec = decoder(model, tok)
    dec.embed = torch.nn.Embedding(4, 2).half()  # only its dtype is read: the target's dtype
    with pytest.raises(AlignfastArgumentError, match=r"at new token 3 \(2 prompt\(s\)\), so no token can be "
                       r"proposed from them; the likely cause is the target's dtype, float16, .*: load the target in "
                       r"bfloat16 or float32 \(target.dtype in a run file\)$"):
        dec._raise_not_finite(2, 2)
