"""A custom Environment's outputs are checked by the engine right after each call (trainer/env_checks.py): a
request or score too few, a None, a string, a bare list, an answers list that does not match the episodes, is one
line naming the environment class, the method and the field, before anything is trained on or written. Without
the checks these trained silently (zip truncated), or failed deep in the engine under its internal names."""

import math

import pytest
import torch

from alignfast.ops import AlignfastArgumentError
from alignfast.rollout.rewards import WeightedRewards
from alignfast.trainer import AlignProConfig, DirectEnvironment, Environment, EnvOutput, PPOTrainer
from alignfast.trainer import TrainingDivergedError
from alignfast.trainer.env_checks import check_env_output, check_requests
from tests.trainer.tiny import small_world

PROMPTS = [f"what is the {w}" for w in ("cat", "dog", "bird", "fish")] * 2


def my_reward(prompt, answer):
    return float(prompt.split()[-1] in answer.split()) - 0.05 * len(answer.split())


class QuizEnv(Environment):
    """A well-behaved environment that `bad` breaks in one way."""

    def __init__(self, bad=None):
        self.bad = bad

    def policy_requests(self, prompts, columns, *, seed=None):
        requests = [f"answer briefly : {p}" for p in prompts]
        if self.bad == "short_requests":
            return requests[:-1]
        if self.bad == "none_request":
            requests[3] = None
        if self.bad == "short_column":
            columns["hint"] = ["a"] * (len(prompts) - 1)
        if self.bad == "tuple_requests":
            return tuple(requests)  # a sequence is fine
        return requests

    def step(self, prompts, outputs, columns, *, seed):
        scores = [my_reward(p, o) for p, o in zip(prompts, outputs)]
        per_func = {"my_reward": list(scores)}
        answers = [[o] for o in outputs]
        if self.bad == "list":
            return scores
        if self.bad == "short_scores":
            scores = scores[:-1]
        if self.bad == "no_answers":
            answers = []
        if self.bad == "str_answers":
            answers = list(outputs)
        if self.bad == "str_score":
            scores[2] = "1.0"
        if self.bad == "short_per_func":
            per_func["my_reward"] = per_func["my_reward"][:2]
        if self.bad == "none_score":
            scores[1] = None
            per_func["my_reward"][1] = None
        if self.bad == "nan_score":
            scores[1] = per_func["my_reward"][1] = float("nan")
        return EnvOutput(scores=scores, per_func=per_func, answers=answers)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    small_world(root, prompter_seed=3, name="policy", hidden=32)
    return root


def _trainer(world, tmp_path, env):
    cfg = AlignProConfig(output_dir=str(tmp_path / "out"), seed=0, response_length=3,
                         per_device_train_batch_size=len(PROMPTS), per_device_eval_batch_size=4, num_mini_batches=1,
                         num_ppo_epochs=1, max_steps=1, save_strategy="no", logging_steps=1)
    return PPOTrainer(cfg, str(world / "policy"), None, env, train_dataset=PROMPTS)


@pytest.mark.parametrize("bad, message", [
    ("short_requests", r"^alignfast: QuizEnv\.policy_requests returned 7 requests for 8 prompts$"),
    ("none_request", r"^alignfast: QuizEnv\.policy_requests returned requests\[3\] None: it must be a str, got "
                     r"NoneType$"),
    ("short_column", r"^alignfast: QuizEnv\.policy_requests left columns\['hint'\] with 7 values for 8 prompts"),
    ("list", r"^alignfast: QuizEnv\.step must return an EnvOutput, got list$"),
    ("short_scores", r"^alignfast: QuizEnv\.step returned 7 scores for 8 episodes$"),
    ("no_answers", r"^alignfast: QuizEnv\.step returned 0 answers for 8 episodes"),
    ("str_answers", r"^alignfast: QuizEnv\.step returned answers\[0\] '.*': it must be a list of str .*got str$"),
    ("str_score", r"^alignfast: QuizEnv\.step returned scores\[2\] '1\.0': it must be a number \(a float\), got str$"),
    ("short_per_func", r"^alignfast: QuizEnv\.step returned per_func\['my_reward'\] with 2 values for 8 episodes$"),
])
def test_a_bad_environment_output_is_one_line_naming_class_method_and_field(world, tmp_path, bad, message):
    trainer = _trainer(world, tmp_path, QuizEnv(bad))
    with pytest.raises(AlignfastArgumentError, match=message) as info:
        trainer.train()
    assert "\n" not in str(info.value)
    assert trainer.global_step == 0 and trainer.history == []
    assert not (tmp_path / "out" / "samples.jsonl").exists()  # nothing was written from the bad step
    with pytest.raises(AlignfastArgumentError, match=message.replace(" 8 ", " 4 ").replace(" 7 ", " 3 ")):
        trainer.rollout(PROMPTS[:4])  # the same check on the evaluation path (4 prompts per chunk)


def test_an_unscored_episode_names_the_environment_reward_and_episode_not_a_divergence(world, tmp_path):
    trainer = _trainer(world, tmp_path, QuizEnv("none_score"))
    with pytest.raises(AlignfastArgumentError, match=r"^alignfast: QuizEnv\.step returned no score \(None\) for "
                       r"episode 1: reward function 'my_reward' returned None for it; "
                       r"prompt 'what is the \w+'\. ") as e:
        trainer.train()
    assert not isinstance(e.value, TrainingDivergedError) and "\n" not in str(e.value)
    # a process's share of the batch numbers its episodes from its first row
    out = EnvOutput(scores=[1.0, None], per_func={}, answers=[["a"], ["b"]])
    with pytest.raises(AlignfastArgumentError, match=r"QuizEnv\.step returned no score \(None\) for episode 5; "):
        check_env_output(QuizEnv(), out, ["p", "q"], first_episode=4)


def test_a_nan_score_is_still_a_divergence_naming_step_episode_and_function(world, tmp_path):
    trainer = _trainer(world, tmp_path, QuizEnv("nan_score"))
    with pytest.raises(TrainingDivergedError, match=r"non-finite reward nan at step 1 for episode 1 \(reward "
                       r"function 'my_reward' returned nan\)"):
        trainer.train()


def test_a_good_custom_environment_trains_and_rolls_out(world, tmp_path):
    trainer = _trainer(world, tmp_path, QuizEnv("tuple_requests"))
    assert trainer.train().global_step == 1
    res = trainer.rollout(PROMPTS)
    assert len(res.answers) == len(res.scores) == len(PROMPTS) and all(math.isfinite(s) for s in res.scores)
    assert len(res.reward_components["my_reward"]) == len(PROMPTS)


def test_the_built_in_environment_outputs_pass():
    env = DirectEnvironment(WeightedRewards([lambda p, c, **k: [1, True, 0.5]]))  # numbers of any kind
    columns = {"extra": [1, 2, 3]}
    requests = check_requests(env, env.policy_requests(["a", "b", "c"], columns), columns, 3)
    check_env_output(env, env.step(["a", "b", "c"], ["x", "y", "z"], columns, seed=0), ["a", "b", "c"])
    assert requests == ["a", "b", "c"]
    # EnvOutput's defaults (no requests, timings or tokens) pass
    check_env_output(env, EnvOutput(scores=[0.0], per_func={}, answers=[[]]), ["a"])


def test_the_environment_contract_is_written_where_researchers_read_it():
    doc = Environment.__doc__
    for statement in ("policy_requests(prompts, columns, *, seed) -> list of len(prompts) str",
                      "step(prompts, outputs, columns, *, seed) -> EnvOutput", "one finite number per episode",
                      "last response token", "KL penalty", "frozen copy of the initial policy", "adapter off",
                      "chat template", "tokenizer.chat_template = None", "`target`", "trainer.rollout(prompts)",
                      "trainer.evaluate(eval_dataset)", "`alignfast eval` has no flag"):
        assert statement in doc, statement
    for field_name in ("scores", "per_func", "answers", "requests", "timings", "generated_tokens",
                       "samples.jsonl", "rewards/<name>"):
        assert field_name in EnvOutput.__doc__, field_name


def _policy_inputs(trainer, requests):
    sampled = trainer._sample(PROMPTS[:len(requests)], {}, greedy=True, seed=0)
    return [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(sampled.query_ids.tolist(),
                                                                     sampled.query_mask.tolist())]


def test_requests_reach_the_policy_in_its_chat_template_unless_the_tokenizer_has_none(world, tmp_path):
    """What the docstring says of the policy's input: the chat template's user turn, with no setting to switch it
    off in PPOTrainer; a tokenizer whose chat_template is None sends the request as plain text."""
    trainer = _trainer(world, tmp_path, QuizEnv())
    tok = trainer.tokenizer
    requests = QuizEnv().policy_requests(PROMPTS[:2], {})
    chat = [tok.apply_chat_template([{"role": "user", "content": r}], add_generation_prompt=True, tokenize=False)
            for r in requests]
    assert _policy_inputs(trainer, requests) == [tok(c, add_special_tokens=False)["input_ids"] for c in chat]
    tok.chat_template = None
    assert _policy_inputs(trainer, requests) == [tok(r)["input_ids"] for r in requests]


def test_tensor_and_numpy_scores_are_taken_as_before_the_checks():
    """The engine built its tensors from whatever step returned, so a torch tensor or numpy array of scores (or of a
    reward's values) and a 0-d tensor of generated tokens trained; the checks take them as lists and ints."""
    import numpy as np

    class E:
        pass

    for scores in (torch.tensor([1.0, 2.0]), np.array([1.0, 2.0]), [torch.tensor(1.0), np.float32(2.0)]):
        out = EnvOutput(scores=scores, per_func={"r": np.array([1.0, 2.0])}, answers=[["a"], ["b"]],
                        generated_tokens=torch.tensor(3))
        check_env_output(E(), out, ["p", "q"])
        assert [float(s) for s in out.scores] == [1.0, 2.0] and out.per_func == {"r": [1.0, 2.0]}
        assert out.generated_tokens == 3 and isinstance(out.generated_tokens, int)


@pytest.mark.parametrize("field, value", [("generated_tokens", torch.tensor([1, 2])), ("scores", "several")])
def test_a_several_element_tensor_is_the_checks_one_line_not_items_error(field, value):
    """.item() of a several-element tensor or array raised torch's or numpy's own error (which a launcher's other
    processes would not have agreed on); the checks' one line names the field instead."""
    import numpy as np

    class E:
        pass

    kwargs = dict(scores=[1.0, 2.0], per_func={}, answers=[["a"], ["b"]])
    kwargs[field] = [np.array([1.0, 2.0]), 1.0] if value == "several" else value
    with pytest.raises(AlignfastArgumentError, match=rf"^alignfast: E\.step returned .*{field}"):
        check_env_output(E(), EnvOutput(**kwargs), ["p", "q"])
