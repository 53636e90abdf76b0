"""The engine's sampling (per-row counter-based uniforms, inverse-CDF top-p) and batch planning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignfast.rollout._batching import build_units, plan_batches
from alignfast.rollout._sampling import choose_tokens, row_key, step_uniforms


def test_engine_row_keys_differ_in_every_field():
    base = row_key(1, [5, 6, 7], 0, 0)
    others = [row_key(2, [5, 6, 7], 0, 0), row_key(1, [5, 6, 8], 0, 0), row_key(1, [5, 6, 7], 1, 0),
              row_key(1, [5, 6, 7], 0, 1), row_key(1, [5, 6], 0, 0)]
    assert len({base, *others}) == 6
    assert base == row_key(1, (5, 6, 7), 0, 0)  # a pure function of its inputs
    assert 0 <= base < 2**64


def test_engine_step_uniforms_are_uniform_and_per_row():
    keys = np.array([row_key(0, [i], 0, 0) for i in range(20000)], dtype=np.uint64)
    u0, u1 = step_uniforms(keys, 0), step_uniforms(keys, 1)
    assert u0.dtype == np.float32 and (u0 >= 0).all() and (u0 < 1).all()
    # the same row draws the same number whatever its neighbours
    assert u0[123] == step_uniforms(keys[120:130], 0)[3]
    assert not np.array_equal(u0, u1)
    # moments and a 20-bin histogram of U(0, 1): std error of each bin count is ~sqrt(1000) ~ 32
    for u in (u0, u1):
        assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
        counts, _ = np.histogram(u, bins=20, range=(0, 1))
        assert np.abs(counts - 1000).max() < 160
    assert abs(np.corrcoef(u0, u1)[0, 1]) < 0.03


def _frequencies(logits_row, *, temperature, top_p, samples=40000):
    keys = np.array([row_key(7, [1], 0, s) for s in range(samples)], dtype=np.uint64)
    uniforms = torch.from_numpy(step_uniforms(keys, 0))
    logits = logits_row.expand(samples, -1)
    tokens = choose_tokens(logits, temperature=temperature, top_p=top_p, uniforms=uniforms)
    return torch.bincount(tokens, minlength=logits_row.numel()).double() / samples


def test_engine_sampling_matches_softmax():
    logits = torch.tensor([1.0, 2.5, -0.5, float("-inf"), 0.3, 2.0, -3.0])
    for temperature in (0.7, 1.0, 1.8):
        want = torch.softmax(logits.double() / temperature, -1)
        got = _frequencies(logits, temperature=temperature, top_p=1.0)
        # binomial std of a frequency with N=40000 is <= 0.0025; allow 4 sigma
        assert (got - want).abs().max() < 0.01, (temperature, got, want)
        assert got[3] == 0  # -inf is never drawn


def test_engine_top_p_samples_the_renormalised_nucleus():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0, 2.9])
    p = torch.softmax(logits.double(), -1)
    order = p.argsort(descending=True)
    for top_p in (0.3, 0.6, 0.9, 0.99):
        before = torch.cumsum(p[order], 0) - p[order]
        keep = order[before < top_p]
        want = torch.zeros_like(p)
        want[keep] = p[keep] / p[keep].sum()
        got = _frequencies(logits, temperature=1.0, top_p=top_p)
        assert (got - want).abs().max() < 0.01, (top_p, got, want)
        outside = torch.ones_like(p, dtype=torch.bool)
        outside[keep] = False
        assert got[outside].sum() == 0


def test_engine_greedy_is_argmax_and_sampling_edge_uniforms():
    logits = torch.randn(5, 33)
    assert torch.equal(choose_tokens(logits, temperature=0.0, top_p=1.0, uniforms=None), logits.argmax(-1))
    # u = 0 picks the first token with mass, u just below 1 the last one with mass (never a zero-mass one)
    logits = torch.tensor([[float("-inf"), 0.0, 1.0, float("-inf")]] * 2)
    u = torch.tensor([0.0, 1.0 - 2.0**-24])
    assert choose_tokens(logits, temperature=1.0, top_p=1.0, uniforms=u).tolist() == [1, 2]
    # bf16 logits are sampled in fp32
    out = choose_tokens(torch.randn(4, 50, dtype=torch.bfloat16), temperature=1.0, top_p=0.8,
                        uniforms=torch.rand(4))
    assert out.dtype == torch.long and ((out >= 0) & (out < 50)).all()


def _slots(batches):
    return sorted(s for b in batches for u in b for row in u.row_slots for s in row)


@pytest.mark.parametrize("greedy,dedupe", [(True, True), (False, True), (False, False), (True, False)])
def test_engine_plan_covers_every_slot_once_within_budget(greedy, dedupe):
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 100, int(rng.integers(1, 40)))) for _ in range(30)]
    prompts += [prompts[3], prompts[3], prompts[7]]
    n, max_new, budget = 3, 10, 400
    units = build_units(prompts, n=n, greedy=greedy, seed=1, dedupe=dedupe)
    expected_units = (len(prompts) - 3 if dedupe else len(prompts) * (1 if greedy and dedupe else n))
    assert len(units) == expected_units
    batches = plan_batches(units, max_new_tokens=max_new, max_batch_tokens=budget, max_batch_size=16)
    assert _slots(batches) == sorted((r, s) for r in range(len(prompts)) for s in range(n))
    lengths = [len(u.ids) for b in batches for u in b]
    assert lengths == sorted(lengths, reverse=True)
    for b in batches:
        rows = sum(u.rows for u in b)
        assert rows <= 16
        assert rows * (max(len(u.ids) for u in b) + max_new) <= budget or rows == 1
    if greedy and dedupe:
        assert all(u.rows == 1 for u in units)
        assert len(units[3].row_slots[0]) == 3 * n  # three occurrences, n samples each


def test_engine_plan_splits_a_unit_that_overflows_the_budget():
    units = build_units([[5] * 30], n=10, greedy=False, seed=0, dedupe=True)
    batches = plan_batches(units, max_new_tokens=10, max_batch_tokens=120)
    assert [sum(u.rows for u in b) for b in batches] == [3, 3, 3, 1]
    assert len({k for b in batches for u in b for k in u.row_keys}) == 10
