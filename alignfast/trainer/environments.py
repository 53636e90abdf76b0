"""Environments: what turns the trained policy's outputs into scores.

The PPO engine is the same for every method; only the environment changes:

    policy_requests(prompts, columns, seed) -> the user message the policy answers, per prompt; it may add
                                               per-episode columns (a draft answer, ...) that step and the
                                               reward functions then receive
    step(prompts, outputs, columns, seed) -> EnvOutput (one score per episode + what happened)

AlignProEnvironment: the policy output is a rewrite x'; the frozen target answers it (y ~ piF(.|x'))
and the reward scores r(x, y) on the ORIGINAL prompt x, averaged over target_num_samples answers.
Everything here is environment dynamics: no gradient, log-prob or KL is taken on y.
DirectEnvironment (Oracle / standard RLHF): the policy output is the answer; score r(x, y).
AlignerEnvironment (Aligner, Ji et al. 2024): the frozen target drafts y0 before the policy acts; the
policy, a small corrector, rewrites the draft; score r(x, y). Train any of them with trainer.PPOTrainer.

The contract of the two methods, and what else the engine reads where an environment has it (`target`,
`rewards`, `batch_size`, `describe()`), is in Environment's docstring.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from alignfast.ops._checks import fail
from alignfast.rollout import templates
from alignfast.rollout.engine import Completion
from alignfast.rollout.rewards import WeightedRewards


@dataclass
class EnvOutput:
    """What Environment.step returns for n episodes (n = len(prompts); the engine checks lengths and types, see
    trainer/env_checks.py):

    scores           n numbers, the episode's scalar reward (finite; None is an error, NaN/inf a divergence)
    per_func         {name: n numbers or None}: each reward component (None: not scored for that episode);
                     logged as rewards/<name> (train) and eval/rewards/<name>, RolloutResult.reward_components
    answers          n lists of str: the final answers scored for episode i (answers[i][0], or "" when empty,
                     goes to samples.jsonl and RolloutResult.answers; the lists to RolloutResult.all_answers)
    requests         [] or n values: what the environment sent onward (a target's requests); for the caller
                     to inspect, the engine does not read it
    timings          {name: seconds}: "target_gen" and "reward" are logged as timing_s/<name>
    generated_tokens tokens the environment generated (counted in tokens/s)
    """

    scores: list[float]
    per_func: dict[str, list[float | None]]
    answers: list[list[str]]
    requests: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    generated_tokens: int = 0


class Environment(abc.ABC):
    """What a PPO method does around its policy (see the module docstring). The contract, which the engine checks
    after each call (lengths and types: one line naming the class, the method and the field):

    policy_requests(prompts, columns, *, seed) -> list of len(prompts) str, in the prompts' order: the user
        message the policy answers for each prompt. prompts: one batch (a PPO step's, or a process's share of it
        under a launcher; a chunk of per_device_eval_batch_size in rollout()). columns: the dataset's other
        columns, {name: one value per prompt}; it may add lists of len(prompts) (episode state computed before
        the policy acts), which step and the reward functions then receive. seed: an int the engine derives from
        config.seed and the step (rollout(): its seed and the chunk); use it for any sampling here, so that runs
        repeat. Each request goes through the policy tokenizer's chat template as the user turn (plain text with
        the tokenizer's special tokens when it has no template). PPOTrainer has no setting to switch the template
        off (config.target_use_chat_template is the frozen target's): set tokenizer.chat_template = None to send
        requests as plain text. A request over config.max_prompt_length tokens (by default what the policy's
        max_position_embeddings leaves beside response_length) keeps its last tokens, with a warning.
    step(prompts, outputs, columns, *, seed) -> EnvOutput for the same episodes: outputs[i] is the policy's
        decoded response to requests[i] (stop and special tokens dropped, whitespace stripped); columns as
        policy_requests left them; seed an int as above. scores[i] is one finite number per episode, its scalar
        reward: PPO adds it at the last response token (less config.missing_eos_penalty when the response did not
        end), beside a per-token KL penalty (config.kl_coef; adaptive with kl_target) against the reference
        policy: ref_model when given, else a frozen copy of the initial policy, or with LoRA the policy's base
        with the adapter off. answers, per_func, requests, timings: see EnvOutput.

    Attributes the engine reads where an environment has them: `target`, the frozen target engine (an HFEngine's
    .model is shared with the reference policy under config.share_frozen_weights when the weights are the same; its
    name and weights are recorded in checkpoints, and a resume on another target warns); `rewards`, a
    WeightedRewards (PPOTrainer records its functions and weights in checkpoints); `batch_size`, the chunk size of
    the environment's own seeded calls (under a launcher a process's seeds are offset by its first row // batch_size
    when that divides, else by its first row). And `describe()`: JSON-able settings that decide what the policy sees
    (templates, the target's decoding), recorded with the saved model (alignfast_arm.json, trainer_state.json) so
    that `alignfast eval` can rebuild and check the environment the policy was trained in.

    Evaluate a policy trained in a custom environment with trainer.rollout(prompts) (the policy's outputs, the
    answers, scores and reward components) or trainer.evaluate(eval_dataset) (eval/scores, eval/rewards/<name>);
    during training with eval_dataset and config.eval_steps. A saved policy folder (save_model) can be passed as
    the model of a new PPOTrainer for this. `alignfast eval` has no flag for a custom environment.
    """

    @abc.abstractmethod
    def policy_requests(self, prompts: Sequence[str], columns: dict[str, list], *,
                        seed: int | None = None) -> list[str]:
        """The policy's user message per prompt. May add lists of len(prompts) to `columns` (episode state
        computed before the policy acts); `step` and the reward functions receive them."""
        ...

    @abc.abstractmethod
    def step(self, prompts: Sequence[str], outputs: Sequence[str], columns: dict[str, list], *,
             seed: int | None) -> EnvOutput:
        ...

    def describe(self) -> dict | None:
        """The settings that decide what the policy sees, JSON-able (recorded with the saved model); None: none
        recorded (an environment that does not say)."""
        return None


class DirectEnvironment(Environment):
    """The policy answers the prompt itself; the reward scores its answer (standard RLHF)."""

    def __init__(self, rewards: WeightedRewards):
        self.rewards = rewards

    def describe(self) -> dict:
        return {}

    def policy_requests(self, prompts, columns, *, seed=None):
        return list(prompts)

    def step(self, prompts, outputs, columns, *, seed):
        t0 = time.perf_counter()
        out = self.rewards(list(prompts), list(outputs), **columns)
        return EnvOutput(scores=out.total, per_func=out.per_func, answers=[[o] for o in outputs],
                         requests=list(prompts), timings={"reward": time.perf_counter() - t0})


def check_target_system_prompt(target, target_tokenizer, system_prompt, *, use_chat_template: bool, name: str,
                               instead: str = templates.TARGET_TEMPLATE_HINT,
                               switch: str = "target_use_chat_template") -> None:
    """The system message reaches a target through its tokenizer's chat template (templates.check_system_prompt);
    an OpenAIEngine, sent plain text, carries its own (its server applies the chat template)."""
    from alignfast.rollout.openai_engine import OpenAIEngine

    if system_prompt is not None and target_tokenizer is None and isinstance(target, OpenAIEngine):
        fail(name, "is put in the target tokenizer's chat template, and an OpenAIEngine target is sent plain text "
             "that its server formats: give it as OpenAIEngine(system_prompt=...)")
    templates.check_system_prompt(target_tokenizer, system_prompt, use_chat_template=use_chat_template, name=name,
                                  instead=instead, switch=switch)


class AlignProEnvironment(Environment):
    """x -> rewrite instruction -> (policy) x' -> target request -> (frozen target) y -> r(x, y).

    The target request is target_prompt_template filled with x' (and x), in the target tokenizer's chat template
    after `system_prompt` as the system message when one is given."""

    def __init__(self, target, rewards: WeightedRewards, *, target_tokenizer=None, rewrite_template: str,
                 target_prompt_template: str = "{rewrite}", max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, num_samples: int = 1, batch_size: int = 32, use_chat_template: bool = True,
                 system_prompt: str | None = None):
        check_target_system_prompt(target, target_tokenizer, system_prompt, use_chat_template=use_chat_template,
                                   name="system_prompt", switch="use_chat_template")
        self.target = target
        self.rewards = rewards
        self.target_tokenizer = target_tokenizer
        self.rewrite_template = rewrite_template
        self.target_prompt_template = target_prompt_template
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt

    @classmethod
    def from_config(cls, config, target, rewards: WeightedRewards, *, target_tokenizer=None) -> AlignProEnvironment:
        """The environment an AlignProConfig describes (its rewrite_template and target_* fields): one place
        for that mapping, shared by the trainer and `alignfast eval`."""
        check_target_system_prompt(target, target_tokenizer, config.target_system_prompt,
                                   use_chat_template=config.target_use_chat_template, name="target_system_prompt")
        return cls(target, rewards, target_tokenizer=target_tokenizer, rewrite_template=config.rewrite_template,
                   target_prompt_template=config.target_prompt_template, max_new_tokens=config.target_max_new_tokens,
                   temperature=config.target_temperature, top_p=config.target_top_p,
                   num_samples=config.target_num_samples, batch_size=config.target_batch_size,
                   use_chat_template=config.target_use_chat_template, system_prompt=config.target_system_prompt)

    def describe(self) -> dict:
        return {"rewrite_template": self.rewrite_template, "target_prompt_template": self.target_prompt_template,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "num_samples": self.num_samples, "use_chat_template": self.use_chat_template,
                "system_prompt": self.system_prompt}

    def policy_requests(self, prompts, columns, *, seed=None):
        return templates.rewrite_instructions(self.rewrite_template, prompts)

    def target_inputs(self, requests: Sequence[str]) -> list:
        """Token ids in the target's chat format when its tokenizer is known, else the plain request text.

        An empty rewrite (the prompter's first token was EOS) to a target without a chat template whose
        tokenizer adds no BOS (GPT-2-style base models) would be zero tokens, which no engine can continue:
        it becomes the tokenizer's BOS (else EOS) token alone, what generate() starts from without input."""
        if self.target_tokenizer is None:
            return list(requests)
        out = []
        for r in requests:
            ids = templates.user_turn_ids(self.target_tokenizer, r, use_chat_template=self.use_chat_template,
                                          system_prompt=self.system_prompt)
            out.append(ids if ids else self._start_token())
        return out

    def _start_token(self) -> list[int]:
        tok = self.target_tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            fail("target_tokenizer", "has no chat template, BOS or EOS token, so an empty rewrite leaves the target "
                 "no token to start from")
        return [int(start)]

    def answer(self, requests: Sequence[str], *, seed: int | None) -> tuple[list[list[str]], int]:
        """The target's answers (num_samples per request, leading and trailing whitespace stripped) and the
        number of tokens it generated."""
        completions, n_tokens = self.completions(requests, seed=seed)
        return [[c.text for c in per_prompt] for per_prompt in completions], n_tokens

    def completions(self, requests: Sequence[str], *, seed: int | None) -> tuple[list[list[Completion]], int]:
        """As `answer`, the engine's Completions kept (text stripped): finish_reason 'length' marks an answer cut at
        max_new_tokens, which the text alone cannot tell from a finished one."""
        inputs = self.target_inputs(requests)
        answers: list[list[Completion]] = []
        n_tokens = 0
        for chunk_index, start in enumerate(range(0, len(inputs), self.batch_size)):
            chunk = inputs[start: start + self.batch_size]
            chunk_seed = None if seed is None else seed + chunk_index
            completions = self.target.generate(chunk, max_new_tokens=self.max_new_tokens,
                                               temperature=self.temperature, top_p=self.top_p,
                                               n=self.num_samples, seed=chunk_seed)
            if len(completions) != len(chunk):
                raise RuntimeError(f"alignfast: the target engine returned {len(completions)} lists for "
                                   f"{len(chunk)} prompts")
            for i, per_prompt in enumerate(completions):
                if len(per_prompt) != self.num_samples:  # else the episode's reward would be a missing (None) mean
                    raise RuntimeError(f"alignfast: the target engine ({type(self.target).__name__}) returned "
                                       f"{len(per_prompt)} completions for prompt {start + i} of the batch, "
                                       f"{self.num_samples} were asked (target_num_samples); request: "
                                       f"{str(requests[start + i])[:80]!r}")
                # Stripped as every other model's output is (the prompter's rewrite, the Oracle's and the
                # proxy's answers, the corrector's): the reward and the eval arms see one post-processing.
                answers.append([dataclasses.replace(c, text=c.text.strip()) for c in per_prompt])
                n_tokens += sum(c.generated_tokens for c in per_prompt)
        return answers, n_tokens

    def step(self, prompts, outputs, columns, *, seed):
        prompts, rewrites = list(prompts), list(outputs)
        requests = templates.target_requests(self.target_prompt_template, prompts, rewrites)
        t0 = time.perf_counter()
        answers, n_tokens = self.answer(requests, seed=seed)
        t1 = time.perf_counter()
        # One reward call over every (episode, sample) pair; then the mean over each episode's samples.
        owner = [i for i, a in enumerate(answers) for _ in a]
        flat_answers = [y for a in answers for y in a]
        flat_columns = {k: [v[i] for i in owner] for k, v in columns.items()}
        flat_columns["rewrites"] = [rewrites[i] for i in owner]
        out = self.rewards([prompts[i] for i in owner], flat_answers, **flat_columns)
        t2 = time.perf_counter()
        scores = _episode_means(out.total, owner, len(prompts))
        per_func = {name: _episode_means(values, owner, len(prompts)) for name, values in out.per_func.items()}
        return EnvOutput(scores=scores, per_func=per_func, answers=answers, requests=requests,
                         timings={"target_gen": t1 - t0, "reward": t2 - t1}, generated_tokens=n_tokens)


def _episode_means(values: list, owner: list[int], n: int) -> list:
    """Mean of the non-None values of each episode (None when it has none)."""
    sums, counts = [0.0] * n, [0] * n
    for v, i in zip(values, owner):
        if v is not None:
            sums[i] += v
            counts[i] += 1
    return [s / c if c else None for s, c in zip(sums, counts)]


DEFAULT_CORRECTION_TEMPLATE = "{prompt}\n\nDraft answer: {draft}\n\nWrite an improved answer."


class AlignerEnvironment(Environment):
    """x -> (frozen target) draft y0 -> (policy, the corrector) y given (x, y0) -> r(x, y).

    The draft is environment dynamics computed before the policy acts: policy_requests asks the target
    (greedy by default, seeded), stores the drafts in columns["draft"] (the reward functions see them),
    and renders `correction_template` ({prompt}, {draft}). The policy's output is the final answer.
    """

    def __init__(self, target, rewards: WeightedRewards, *, target_tokenizer=None,
                 correction_template: str = DEFAULT_CORRECTION_TEMPLATE, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 32, use_chat_template: bool = True,
                 system_prompt: str | None = None):
        for field_name in ("{prompt}", "{draft}"):
            if field_name not in correction_template:
                fail("correction_template", f"must contain {field_name}, got {correction_template!r}")
        check_target_system_prompt(target, target_tokenizer, system_prompt, use_chat_template=use_chat_template,
                                   name="system_prompt", instead="put the text in the prompts instead",
                                   switch="use_chat_template")
        self.rewards = rewards
        self.correction_template = correction_template
        # The target is asked the original prompt as it is: Align-Pro's target call with the identity rewrite.
        self._drafter = AlignProEnvironment(
            target, rewards, target_tokenizer=target_tokenizer, rewrite_template="{prompt}",
            target_prompt_template="{rewrite}", max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, num_samples=1, batch_size=batch_size, use_chat_template=use_chat_template,
            system_prompt=system_prompt)

    @property
    def target(self):
        """The frozen target engine that drafts (read by the trainer: share_frozen_weights, resume records)."""
        return self._drafter.target

    @property
    def target_tokenizer(self):
        return self._drafter.target_tokenizer

    @property
    def batch_size(self) -> int:
        """The drafts' chunk size, which the engine reads to seed a process's share as one process would."""
        return self._drafter.batch_size

    def describe(self) -> dict:
        d = self._drafter
        return {"correction_template": self.correction_template, "max_new_tokens": d.max_new_tokens,
                "temperature": d.temperature, "top_p": d.top_p, "use_chat_template": d.use_chat_template,
                "system_prompt": d.system_prompt}

    def policy_requests(self, prompts, columns, *, seed=None):
        drafts, _ = self._drafter.answer(list(prompts), seed=seed)
        return self.requests_from_drafts(prompts, [d[0] if d else "" for d in drafts], columns)

    def requests_from_drafts(self, prompts, drafts, columns) -> list[str]:
        """The policy's requests for drafts given (columns["draft"] set to them): what policy_requests does after
        the target drafts; `alignfast eval` gives the No fine-tuning answers, the drafts its other arms correct."""
        if len(drafts) != len(prompts):
            raise ValueError(f"alignfast: argument 'drafts' has {len(drafts)} values for {len(prompts)} prompts")
        columns["draft"] = list(drafts)
        return [templates.render(self.correction_template, prompt=p, draft=d)
                for p, d in zip(prompts, columns["draft"], strict=True)]

    def step(self, prompts, outputs, columns, *, seed):
        t0 = time.perf_counter()
        out = self.rewards(list(prompts), list(outputs), **columns)
        return EnvOutput(scores=out.total, per_func=out.per_func, answers=[[o] for o in outputs],
                         requests=list(prompts), timings={"reward": time.perf_counter() - t0})
