"""The analysis' estimators on hand-checkable inputs, and one small run on the shipped world."""

import math

import pytest

from alignfast.toy.analysis import _optimum, _optimum_weights, _win, analyse, classify_rewrite, format_report


def test_optimum_weights_limits():
    rewards = [0.0, 0.5, 1.0, 1.0]
    uniform = _optimum_weights(rewards, 1e6)
    assert uniform == pytest.approx([0.25] * 4)
    expected, kl = _optimum(rewards, uniform)
    assert expected == pytest.approx(0.625) and kl == pytest.approx(0.0, abs=1e-9)
    greedy = _optimum_weights(rewards, 1e-3)
    assert greedy == pytest.approx([0, 0, 0.5, 0.5])
    expected, kl = _optimum(rewards, greedy)
    assert expected == pytest.approx(1.0) and kl == pytest.approx(math.log(2))


def test_optimum_weights_formula():
    rewards, lam = [0.2, 0.9], 0.1
    w = _optimum_weights(rewards, lam)
    assert w[1] / w[0] == pytest.approx(math.exp(0.7 / lam))


def test_win_counts_ties_as_half():
    assert _win([1.0, 0.5, 0.0], [0.5, 0.25, 0.25], baseline=0.5) == pytest.approx(0.5 + 0.125)


@pytest.mark.parametrize("rewrite, kind", [
    ("sort 4 1 3", "copy"),
    ("sort these numbers from smallest to largest : 4 1 3", "intended"),
    ("arrange the numbers in increasing order : 4 1 3", "intended"),
    ("sort these numbers from largest to smallest : 4 1 3", "wrong"),
    ("sort these numbers from smallest to largest : 4 1", "other"),
    ("", "other"),
])
def test_classify_rewrite(rewrite, kind):
    assert classify_rewrite("sort 4 1 3", rewrite) == kind


def test_small_analysis_orders_the_arms():
    from alignfast.toy.world import load_world

    rows = load_world().eval_prompts[:10]
    result = analyse(prompts=rows, num_samples=8, lambdas=(0.1,))
    overall = result["overall"]
    assert overall["best_in_support"] >= overall["optimum_reward@0.1"] >= overall["sft"] - 1e-9
    assert 0.0 <= overall["no_fine_tuning"] <= 1.0 and overall["optimum_kl@0.1"] >= 0
    assert set(result["per_task"]) == {r["task"] for r in rows}
    assert "| ρ* at λ=0.1 |" in format_report(result, lambdas=(0.1,))
