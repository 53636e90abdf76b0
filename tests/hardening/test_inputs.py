"""Bad or surprising input from a run file, a data file or a reward function (issue 10 cases 1, 12, 13, 15;
issue 14 item 5): numbers are numbers in either spelling, YAML 1.1's yes/no/on/off stay strings, ragged data is
an error naming the file and the lengths, and a reward function's mistake is one error naming the function."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from alignfast.cli.config import load_run_config, parse_overrides
from alignfast.cli.data import load_prompts
from alignfast.cli.errors import CLIError
from alignfast.ops._checks import AlignfastArgumentError
from alignfast.rollout.rewards import RewardFunctionError, WeightedRewards
from alignfast.trainer import AlignProConfig
from alignfast.trainer.data import PromptDataset

TRAINER_FIELDS = {"learning_rate", "save_strategy", "kl_coef", "seed"}


def test_numbers_are_numbers_in_overrides_and_yaml(tmp_path):
    # the README's own example, and YAML's exponent without a dot (PyYAML's 1.1 resolver read '3e-4' as a string)
    assert parse_overrides(["--learning_rate", "1e-6", "--kl_coef=3E-2", "--seed", "010"]) == \
        [("learning_rate", 1e-6), ("kl_coef", 0.03), ("seed", 10)]
    run = tmp_path / "run.yaml"
    run.write_text("trainer:\n  learning_rate: 3e-4\n  kl_coef: .5\n  save_strategy: no\n  seed: 7\n")
    cfg = load_run_config(run, ["--learning_rate", "1e-6"], trainer_fields=TRAINER_FIELDS)["trainer"]
    assert cfg == {"learning_rate": 1e-6, "kl_coef": 0.5, "save_strategy": "no", "seed": 7}
    AlignProConfig.from_dict(cfg)  # accepted as it is
    assert load_run_config(run, [], trainer_fields=TRAINER_FIELDS)["trainer"]["learning_rate"] == 3e-4


@pytest.mark.parametrize("word", ["no", "yes", "on", "off", "y", "n", "No", "OFF"])
def test_yaml_1_1_words_stay_strings(tmp_path, word):
    run = tmp_path / "run.yaml"
    run.write_text(f"trainer:\n  save_strategy: {word}\n  overwrite_output_dir: true\n")
    cfg = load_run_config(run, [f"--run_name={word}"], trainer_fields={"save_strategy", "run_name",
                                                                          "overwrite_output_dir"})
    assert cfg["trainer"] == {"save_strategy": word, "run_name": word, "overwrite_output_dir": True}
    if word == "no":
        assert AlignProConfig.from_dict({"save_strategy": word}).save_strategy == "no"
    else:  # a string where a choice or a boolean is expected: a one-line error naming the field
        with pytest.raises(AlignfastArgumentError, match="'save_strategy' must be one of"):
            AlignProConfig.from_dict({"save_strategy": word})
        with pytest.raises(AlignfastArgumentError, match="'overwrite_output_dir' must be true or false"):
            AlignProConfig.from_dict({"overwrite_output_dir": word})


def test_special_floats_and_bools(tmp_path):
    (tmp_path / "r.yaml").write_text("trainer: {a: .inf, b: -.Inf, c: .nan, d: True, e: FALSE, f: 0x10, g: null}\n")
    t = load_run_config(tmp_path / "r.yaml")["trainer"]
    assert t["a"] == math.inf and t["b"] == -math.inf and math.isnan(t["c"])
    assert (t["d"], t["e"], t["f"], t["g"]) == (True, False, 16, None)


def test_json_columns_of_different_lengths_name_the_file_and_lengths(tmp_path):
    f = tmp_path / "data.json"
    f.write_text(json.dumps({"prompt": ["a", "b", "c"], "answer": ["1", "2"]}))
    with pytest.raises(CLIError, match=r"data.train: .*data.json has columns of different lengths "
                                       r"\('prompt': 3, 'answer': 2\)"):
        load_prompts({"path": str(f)}, what="train")
    f.write_text(json.dumps({"prompt": ["a", "b"], "answer": "1"}))
    with pytest.raises(CLIError, match=r"column 'answer' is a str, not a list"):
        load_prompts({"path": str(f)}, what="train")
    f.write_text("{not json")
    with pytest.raises(CLIError, match=r"data.json is not JSON"):
        load_prompts({"path": str(f)}, what="train")
    f.write_text(json.dumps({"prompt": ["a", "b"], "answer": ["1", "2"]}))
    assert load_prompts({"path": str(f)}, what="train") == [{"prompt": "a", "answer": "1"},
                                                             {"prompt": "b", "answer": "2"}]


def test_rows_missing_a_column_are_errors_naming_the_record(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(CLIError, match=r"record 1 of .*d.jsonl lacks column 'answer' that record 0 has"):
        load_prompts({"path": str(f)}, what="train")
    f.write_text('{"prompt": "a"}\n{"prompt": "b", "answer": "2"}\n')
    with pytest.raises(CLIError, match=r"record 1 of .*d.jsonl has column 'answer' that record 0 lacks"):
        load_prompts({"path": str(f)}, what="train")
    c = tmp_path / "d.csv"
    c.write_text("prompt,answer\na,1\nb\n")
    with pytest.raises(CLIError, match=r"d.csv line 3 has fewer fields than its header \(2: prompt, answer\)"):
        load_prompts({"path": str(c)}, what="eval")
    c.write_text("prompt,answer\na,1,extra\n")
    with pytest.raises(CLIError, match=r"d.csv line 2 has more fields than its header"):
        load_prompts({"path": str(c)}, what="eval")
    # the Python API: the same mistake in a list of dicts
    with pytest.raises(AlignfastArgumentError, match=r"'train_dataset' row 2 lacks column 'answer' that row 0 has"):
        PromptDataset([{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2}, {"prompt": "c"}])
    with pytest.raises(AlignfastArgumentError, match=r"row 1 has column 'extra' that row 0 lacks"):
        PromptDataset([{"prompt": "a"}, {"prompt": "b", "extra": 2}])
    assert PromptDataset([{"prompt": "a", "x": None}, {"prompt": "b", "x": 1}]).columns == {"x": [None, 1]}
    f.write_text('{"prompt": "a", "answer": "1"}\n')
    with pytest.raises(CLIError, match=r"data.train.columns names 'anwser', which .*d.jsonl does not have"):
        load_prompts({"path": str(f), "columns": ["anwser"]}, what="train")


def scores(prompts, completions, **kwargs):
    return [1.0] * len(completions)


@pytest.mark.parametrize("returned, message", [
    (lambda n: ["1.0"] * n, r"returned str '1.0' for completion 0; each entry must be a number"),
    (lambda n: 0.5, r"returned float 0.5; it must return a list of 2 scores"),
    (lambda n: [[1.0]] * n, r"returned list \[1.0\] for completion 0"),
    (lambda n: None, r"returned NoneType None; it must return a list of 2 scores"),
    (lambda n: {"a": 1}, r"returned dict"),
    (lambda n: [1.0], r"returned 1 scores for 2 completions"),
])
def test_reward_function_bad_returns_name_the_function(returned, message):
    def my_reward(prompts, completions, **kwargs):
        return returned(len(completions))

    with pytest.raises(RewardFunctionError, match=rf"reward function 'my_reward' {message}"):
        WeightedRewards([my_reward])(["p", "q"], ["a", "b"], answer=["1", "2"])


def test_reward_function_good_returns_of_other_types():
    out = WeightedRewards([lambda p, c, **k: np.array([1.0, 2.0]), lambda p, c, **k: torch.tensor([0.5, 1.0]),
                           lambda p, c, **k: [True, None]], [1, 1, 1])(["p", "q"], ["a", "b"])
    assert out.total == [2.5, 3.0]


def test_reward_function_that_raises_or_lacks_kwargs_is_named():
    def broken(prompts, completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(RewardFunctionError, match=r"reward function 'broken' raised KeyError: 'answer'") as info:
        WeightedRewards([broken])(["p"], ["a"])
    assert isinstance(info.value.__cause__, KeyError)  # the original traceback is kept

    def strict(prompts, completions):
        return [1.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=r"reward function 'strict' does not accept the column\(s\) 'answer', "
                                                  r"'rewrites' it is passed: give it a \*\*kwargs parameter"):
        WeightedRewards([strict])(["p"], ["a"], answer=["1"], rewrites=["r"])

    def named(prompts, completions, answer):  # naming every column it gets is fine
        return [float(a == c) for a, c in zip(answer, completions)]

    assert WeightedRewards([named])(["p"], ["1"], answer=["1"]).total == [1.0]


@pytest.mark.parametrize("weights", [["heavy"], [True], [float("nan")], "1.0"])
def test_non_numeric_reward_weights(weights):
    with pytest.raises(AlignfastArgumentError, match="'reward_weights'"):
        WeightedRewards([scores], weights)


def test_non_numeric_reward_weight_through_the_trainer(tmp_path):
    from alignfast.trainer.base import build_rewards

    with pytest.raises(AlignfastArgumentError, match=r"'reward_weights' entry 0 must be a finite number, got 'x'"):
        build_rewards(AlignProConfig(output_dir=str(tmp_path)), reward_model=None, reward_tokenizer=None,
                      reward_funcs=[scores], reward_weights=["x"], device="cpu")


def test_a_target_that_returns_no_completion_is_named():
    from alignfast.rollout.engine import Completion, TargetEngine
    from alignfast.trainer.environments import AlignProEnvironment

    class Silent(TargetEngine):
        def generate(self, prompts, **kw):
            return [[] if i == 1 else [Completion("ok")] for i in range(len(prompts))]

    env = AlignProEnvironment(Silent(), WeightedRewards([scores]), rewrite_template="{prompt}")
    with pytest.raises(RuntimeError, match=r"target engine \(Silent\) returned 0 completions for prompt 1 of the "
                                           r"batch, 1 were asked \(target_num_samples\); request: 'two'"):
        env.step(["one", "two"], ["one", "two"], {}, seed=0)


@pytest.mark.parametrize("value", ["1.0", b"1", True])
def test_op_arguments_that_are_not_numbers(value):
    from alignfast.ops import token_logprobs

    with pytest.raises(AlignfastArgumentError, match=r"'temperature' must be a real number, got"):
        token_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), temperature=value)


def test_the_target_tokens_count_from_usage():
    """tokens/s with an engine that returns text only (OpenAI) counts the response's usage, not 0."""
    from alignfast.rollout.engine import Completion, TargetEngine
    from alignfast.trainer.environments import AlignProEnvironment

    class TextOnly(TargetEngine):
        def generate(self, prompts, **kw):
            return [[Completion("ok", [], "stop", num_tokens=7)] for _ in prompts]

    env = AlignProEnvironment(TextOnly(), WeightedRewards([scores]), rewrite_template="{prompt}")
    assert env.step(["one", "two"], ["one", "two"], {}, seed=0).generated_tokens == 14
