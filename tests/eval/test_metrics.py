"""The comparison metrics and their report formats, on hand-computed cases."""

import json
import math

import pytest

from alignfast.eval import compare_arms, mean_and_variance, read_metrics, reward_curves, to_json, to_markdown
from alignfast.eval import wilson_interval, win_rate
from alignfast.ops import AlignfastArgumentError


class Tok:
    """A policy tokenizer for with_policy without a chat template: user_turn_ids gives the text's ids."""
    chat_template = None
    bos_token_id = eos_token_id = 1

    def __call__(self, text, add_special_tokens=True, **kw):
        return {"input_ids": [ord(c) for c in text]}

    def encode(self, text, add_special_tokens=True, **kw):
        return [ord(c) for c in text]


def length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


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


def test_the_win_rate_interval_is_corrected_for_ties():
    """The interval was Wilson's on wins + ties/2 over n, which assumes every paired score is 0 or 1: with ties
    (½, whichever arm is better) it was too wide (an arm tied with the baseline on all 250 prompts got 0.44-0.56;
    99.8% coverage at 60% ties). It is Wilson at a tie-corrected n_eff, whose variance has a pseudo win and loss:
    from the observed variance alone, rare wins among ties covered the truth 63% of the time."""
    import random

    from alignfast.eval.metrics import win_rate_interval

    assert win_rate_interval(8, 0, 2) == pytest.approx(wilson_interval(8, 10), rel=1e-9)  # no ties: Wilson itself
    assert win_rate_interval(0, 0, 7) == pytest.approx(wilson_interval(0, 7), abs=1e-12)
    assert win_rate_interval(7, 0, 0) == pytest.approx(wilson_interval(7, 7), abs=1e-12)
    low, high = win_rate_interval(0, 250, 0)  # tied everywhere: narrow, not a point
    assert 0.49 < low < 0.5 < high < 0.51
    low, high = win_rate_interval(156, 94, 0)  # the README demo's Align-Pro row
    old_low, old_high = wilson_interval(156 + 47, 250)
    assert old_low < low < 0.812 < high < old_high

    def coverage(n, p_win, p_tie, draws=1500):
        rng, truth, covered = random.Random(0), p_win + 0.5 * p_tie, 0
        for _ in range(draws):
            u = [rng.random() for _ in range(n)]
            w, t = sum(x < p_win for x in u), sum(p_win <= x < p_win + p_tie for x in u)
            lo, hi = win_rate_interval(w, t, n - w - t)
            covered += lo <= truth <= hi
        return covered / draws

    assert 0.93 <= coverage(100, 0.3, 0.4) <= 0.97  # the old interval: ~0.99
    assert coverage(50, 0.02, 0.98) >= 0.95  # rare wins among ties (from the observed variance alone: 0.63)


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


def test_a_run_with_one_logged_point_is_drawn(tmp_path):
    """A line without markers draws nothing for one point: `alignfast demo --episodes 64` logs one record per
    run, and its reward_curve.png showed the legend over empty axes."""
    pytest.importorskip("matplotlib")
    import matplotlib.image

    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"episode": 64, "objective/scores": 0.5}) + "\n")
    out = reward_curves({"Align-Pro": log}, tmp_path / "one.png")
    pixels = matplotlib.image.imread(str(out))[..., :3]
    h, w = pixels.shape[:2]
    centre = pixels[h // 3: 2 * h // 3, w // 3: 2 * w // 3]  # the single point sits mid-axes; the legend is lower right
    run_colour = ((centre - [0x1F / 255, 0x77 / 255, 0xB4 / 255]) ** 2).sum(-1) < 0.01  # matplotlib's C0
    assert run_colour.sum() > 0


def test_an_arm_that_is_the_target_ties_with_no_fine_tuning_on_every_prompt():
    """Every arm's answer gets the same post-processing (stripped): a policy that answers exactly as the target
    does (the Oracle before training) ties on each prompt, though the target's raw text has surrounding blanks."""
    from alignfast.eval.arms import no_fine_tuning, with_policy
    from alignfast.rollout.engine import Completion, TargetEngine
    from alignfast.rollout.rewards import WeightedRewards
    from alignfast.trainer.environments import AlignProEnvironment, DirectEnvironment

    class Raw(TargetEngine):
        def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1, seed=None):
            return [[Completion("\n\n" + ("" if i % 2 else "ok") + "\n") for _ in range(n)]
                    for i in range(len(prompts))]

    rewards = WeightedRewards([length])
    prompts = ["a", "b", "c", "d"]
    env = AlignProEnvironment(Raw(), rewards, rewrite_template="{prompt}")
    base = no_fine_tuning(env, prompts)
    oracle = with_policy("Oracle", DirectEnvironment(rewards), Raw(), Tok(), prompts, max_new_tokens=4,
                         rewrites=False)
    assert base.answers == oracle.answers == ["ok", "", "ok", ""]
    row = compare_arms({"No fine-tuning": base.scores, "Oracle": oracle.scores}, "No fine-tuning")[1]
    assert (row.wins, row.ties, row.losses) == (0, 4, 0)


def test_with_policy_reports_outputs_cut_at_their_budget_where_asked(tmp_path):
    """Only with_corrector reported cut outputs: the Aligner (PPO corrector) arm, decoded by with_policy, scored its
    cut corrections with no count. report_truncated=True gives the result's `truncated` from finish_reason, and
    write_rollouts writes it per row (with the draft each correction started from)."""
    import json

    from alignfast.eval.arms import with_policy, write_rollouts
    from alignfast.rollout.engine import Completion, TargetEngine
    from alignfast.rollout.rewards import WeightedRewards
    from alignfast.trainer.environments import AlignerEnvironment

    class Policy(TargetEngine):
        def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1, seed=None):
            return [[Completion("fixed", finish_reason="length" if i % 2 else "stop")] for i in range(len(prompts))]

    env = AlignerEnvironment(Policy(), WeightedRewards([length]))
    prompts = ["a", "b", "c"]
    assert with_policy("P", env, Policy(), Tok(), prompts, max_new_tokens=2, rewrites=False).truncated is None
    res = with_policy("P", env, Policy(), Tok(), prompts, max_new_tokens=2, rewrites=False, report_truncated=True,
                      drafts=["d0", "d1", "d2"])
    assert res.truncated == [False, True, False] and res.drafts == ["d0", "d1", "d2"]
    rows = [json.loads(x) for x in write_rollouts({"P": res}, tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["draft"], r["truncated"]) for r in rows] == [("d0", False), ("d1", True), ("d2", False)]
