"""bench_trainer refuses to time providers whose first PPO step disagrees (a fast path that trained on other
rollouts, or computed another loss, would be timed as a speed-up)."""

import pytest
import torch

from bench import harness
from bench.bench_trainer import check_same_first_step

STEP = {"objective/scores": 0.397917, "completions/mean_length": 8.28125, "val/num_eos_tokens": 64,
        "loss/policy_avg": -0.007122, "loss/value_avg": 0.126574, "objective/entropy": 1.45632,
        "policy/approxkl_avg": 0.014222}


def test_agreeing_steps_pass_within_the_dtype_tolerance():
    near = {**STEP, "loss/value_avg": STEP["loss/value_avg"] * (1 + 5e-4), "policy/approxkl_avg": 0.014221}
    check_same_first_step("s", {"reference": STEP, "fast": near}, torch.float32)
    bf16 = {**STEP, "loss/value_avg": STEP["loss/value_avg"] * 1.03}
    check_same_first_step("s", {"reference": STEP, "fast": bf16}, torch.bfloat16)


@pytest.mark.parametrize("key, value", [("objective/scores", 0.4), ("completions/mean_length", 8.3),
                                        ("loss/value_avg", 0.13), ("objective/entropy", float("nan"))])
def test_a_disagreeing_step_is_refused_with_the_metric_named(key, value):
    with pytest.raises(harness.ProviderMismatch, match=rf"^bench: s: 'fast' first step {key} = "):
        check_same_first_step("s", {"reference": STEP, "fast": {**STEP, key: value}}, torch.float32)


def test_a_metric_only_one_side_logs_is_not_compared():
    check_same_first_step("s", {"reference": STEP, "fast": {k: v for k, v in STEP.items() if k != "val/num_eos_tokens"}},
                          torch.float32)


def test_scaling_refuses_a_launch_whose_first_step_scores_other_rollouts():
    from bench.bench_scaling import check_same_first_step as scaling_check

    first: dict = {}
    scaling_check((1, 1), {"objective/scores": 0.5}, first)
    scaling_check((2, 1), {"objective/scores": 0.5 + 1e-9}, first)
    with pytest.raises(harness.ProviderMismatch, match=r"^bench_scaling: 2x1: first step objective/scores 0.51, 1x1"):
        scaling_check((2, 1), {"objective/scores": 0.51}, first)
