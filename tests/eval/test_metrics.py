"""The comparison metrics and their report formats, on hand-computed cases."""

import json
import math

import pytest

from alignfast.eval import compare_arms, mean_and_variance, read_metrics, reward_curves, to_json, to_markdown
from alignfast.eval import wilson_interval, win_rate
from alignfast.ops import AlignfastArgumentError


def test_mean_and_unbiased_variance():
    mean, var = mean_and_variance([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert var == pytest.approx(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert mean_and_variance([3.0]) == (3.0, 0.0)
    assert all(math.isnan(v) for v in mean_and_variance([]))


def test_win_rate_counts_ties_half_and_pairs_by_prompt():
    rate, wins, ties, losses = win_rate([1.0, 0.5, 0.2, 0.9], [0.0, 0.5, 0.3, 0.1])
    assert (wins, ties, losses) == (2, 1, 1)
    assert rate == pytest.approx(2.5 / 4)
    same = [0.3, 0.1, 0.7]
    assert win_rate(same, same)[0] == 0.5


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson_interval(8, 10)  # 8/10 -> [0.4902, 0.9433]
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def test_bad_scores_name_the_argument():
    with pytest.raises(AlignfastArgumentError, match="'baseline'"):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(AlignfastArgumentError, match="'scores'.*index 1"):
        win_rate([1.0, float("nan")], [1.0, 1.0])
    with pytest.raises(AlignfastArgumentError, match="'baseline' must name one of the arms"):
        compare_arms({"a": [1.0]}, baseline="b")


def test_compare_arms_table_and_json():
    arms = {"No fine-tuning": [0.1, 0.2, 0.3, 0.4], "Align-Pro": [0.5, 0.2, 0.9, 0.0]}
    rows = compare_arms(arms, baseline="No fine-tuning")
    assert rows[0].win_rate is None and rows[0].n == 4
    assert rows[1].win_rate == pytest.approx((2 + 0.5) / 4)
    assert (rows[1].wins, rows[1].ties, rows[1].losses) == (2, 1, 1)
    md = to_markdown(rows, baseline="No fine-tuning").splitlines()
    assert md[0].startswith("| method | n | mean reward | reward variance | win rate vs No fine-tuning")
    assert md[2].startswith("| No fine-tuning | 4 | 0.250 |") and "—" in md[2]
    assert md[3].startswith("| Align-Pro | 4 | 0.400 |") and "0.625 (" in md[3] and "2 / 1 / 1" in md[3]
    payload = json.loads(to_json(rows, baseline="No fine-tuning", extra={"seed": 7}))
    assert payload["seed"] == 7 and payload["arms"][1]["win_rate"] == pytest.approx(0.625)


def test_reward_curve_png_and_truncated_jsonl(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"episode": 8 * i, "objective/scores": 0.1 * i}) for i in range(5)]
    log.write_text("\n".join(lines) + '\n{"episode": 40, "objec')  # killed mid-write
    assert len(read_metrics(log)) == 5
    pytest.importorskip("matplotlib")
    out = reward_curves({"Align-Pro": log}, tmp_path / "plots" / "reward.png", baselines={"No fine-tuning": 0.1})
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_fine_tuning_ignores_a_template_that_quotes_the_prompt():
    """The baseline is the untouched target on x, whatever the Align-Pro target template adds around x'."""
    from alignfast.eval.arms import no_fine_tuning

    class Env:
        target_prompt_template = "Original: {prompt}\nBetter: {rewrite}"

        def step(self, prompts, outputs, columns, *, seed):
            from types import SimpleNamespace

            requests = [self.target_prompt_template.replace("{prompt}", p).replace("{rewrite}", o)
                        for p, o in zip(prompts, outputs)]
            return SimpleNamespace(answers=[[r] for r in requests], scores=[float(len(r)) for r in requests],
                                   per_func={})

    env = Env()
    res = no_fine_tuning(env, ["x1", "long prompt"])
    assert res.answers == ["x1", "long prompt"] and res.scores == [2.0, 11.0]
    assert env.target_prompt_template.startswith("Original")  # the caller's environment is untouched
