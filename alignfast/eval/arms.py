"""Scoring the paper's three arms on held-out prompts, without building any trainer.

    No fine-tuning : y ~ πF(·|x)                     the frozen target answers the original prompt
    SFT prompter   : x' = ρsft(x) (greedy), y ~ πF(·|x') the prompter before PPO (what PPO starts from)
    Align-Pro      : x' = ρθ(x) (greedy), y ~ πF(·|x')  a trained prompter rewrites, the target answers
    Oracle         : y = πθ(x) (greedy)              the target itself trained with PPO (RLHF)
    Aligner        : y0 ~ πF(·|x), y = c(x, y0) (greedy) a corrector rewrites the target's answer (SFT or PPO)

Each arm is a policy engine (or none) in front of an environment from alignfast.trainer.environments:
the environment builds the policy's input (rewrite instruction, chat template), runs the frozen target
where there is one, and scores r(x, y) on the ORIGINAL prompt. All arms see the same prompts, columns,
target engine, reward and seed, so their scores pair by prompt for the win rate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from dataclasses import dataclass, field

from alignfast.files import write_text_atomically


# The arm of the prompter before PPO (`with_policy(SFT, ...)` with the untrained prompter): the demo's and
# `alignfast eval`'s row name, so tables from both read the same.
SFT = "SFT prompter (before PPO)"


@dataclass
class ArmResult:
    """prompts[i] -> rewrites[i] (the prompt itself where an arm does not rewrite) -> answers[i] -> scores[i].

    samples[i]: every answer the target gave to prompt i when it gives several (target_num_samples > 1; the score
    is their mean reward); None when each prompt has one answer.
    truncated[i]: answers[i] stopped at its model's token budget, not at EOS (it is scored cut); None where the arm
    does not report it (with_corrector does; with_policy where asked, report_truncated=True).
    drafts[i]: the target's answer that answers[i] corrects, for a corrector arm (Aligner); None otherwise.
    notes: lines the report prints under its table about this arm (alignfast eval's cut corrections)."""

    name: str
    prompts: list[str]
    rewrites: list[str]
    answers: list[str]
    scores: list[float]
    components: dict[str, list] = field(default_factory=dict)
    samples: list[list[str]] | None = None
    truncated: list[bool] | None = None
    drafts: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else float("nan")


def _as_floats(scores: Sequence, name: str, prompts: Sequence[str], components: Mapping[str, list]) -> list[float]:
    """The arm's scores as floats; an unscored or non-finite one is an error naming the arm, the prompt and the
    reward that gave it (the table's statistics would otherwise fail later naming none of them)."""
    import math

    from alignfast.ops import AlignfastArgumentError

    for i, s in enumerate(scores):
        if s is None or not math.isfinite(float(s)):
            culprits = [k for k, v in components.items() if v[i] is None or not math.isfinite(float(v[i]))]
            what = "left unscored (every reward returned None)" if s is None else f"scored {float(s)}"
            raise AlignfastArgumentError(
                f"alignfast: arm '{name}': prompt {i} ({str(prompts[i])[:60]!r}) was {what}"
                + (f"; reward {', '.join(repr(c) for c in culprits)} gave it" if culprits else ""))
    return [float(s) for s in scores]


def _samples(answers: Sequence[Sequence[str]]) -> list[list[str]] | None:
    return [list(a) for a in answers] if any(len(a) > 1 for a in answers) else None


def _columns(columns: dict | None, n: int) -> dict[str, list]:
    cols = {k: list(v) for k, v in (columns or {}).items()}
    for k, v in cols.items():
        if len(v) != n:
            raise ValueError(f"alignfast: argument 'columns' entry '{k}' has {len(v)} values for {n} prompts")
    return cols


def policy_outputs(engine, tokenizer, requests: Sequence[str], *, max_new_tokens: int,
                   use_chat_template: bool = True, system_prompt: str | None = None,
                   report_truncated: bool = False) -> list[str] | tuple[list[str], list[bool]]:
    """Greedy answers of a policy model (behind a TargetEngine) to user messages, in its chat format (after
    system_prompt as the system message, when given). report_truncated: (answers, truncated), truncated[i] when
    answer i stopped at max_new_tokens before EOS (finish_reason 'length')."""
    from alignfast.rollout import templates

    ids = [templates.user_turn_ids(tokenizer, r, use_chat_template=use_chat_template, system_prompt=system_prompt)
           for r in requests]
    completions = engine.generate(ids, max_new_tokens=max_new_tokens, temperature=0.0) if ids else []
    texts = [c[0].text.strip() for c in completions]
    if not report_truncated:
        return texts
    return texts, [c[0].truncated for c in completions]


def no_fine_tuning(environment, prompts: Sequence[str], columns: dict | None = None, *, seed: int = 0,
                   name: str = "No fine-tuning") -> ArmResult:
    """The frozen target on the original prompts: an Align-Pro environment given x as its own rewrite, with
    the target template reduced to the rewrite alone (a template that also quotes {prompt} would otherwise
    show the target x twice, which is not the untouched target)."""
    import copy

    prompts = list(prompts)
    if getattr(environment, "target_prompt_template", "{rewrite}") != "{rewrite}":
        environment = copy.copy(environment)
        environment.target_prompt_template = "{rewrite}"
    out = environment.step(prompts, prompts, _columns(columns, len(prompts)), seed=seed)
    return ArmResult(name, prompts, list(prompts), [a[0] if a else "" for a in out.answers],
                     _as_floats(out.scores, name, prompts, out.per_func), dict(out.per_func), _samples(out.answers))


def with_policy(name: str, environment, policy_engine, policy_tokenizer, prompts: Sequence[str],
                columns: dict | None = None, *, max_new_tokens: int, seed: int = 0,
                rewrites: bool = True, system_prompt: str | None = None, report_truncated: bool = False,
                drafts: Sequence[str] | None = None) -> ArmResult:
    """A trained policy in front of `environment`: a prompter whose outputs are rewrites (Align-Pro,
    rewrites=True), the target itself, whose outputs are the answers (Oracle, rewrites=False; system_prompt:
    the target's system message, config.target_system_prompt), or a corrector in an AlignerEnvironment
    (rewrites=False; the result's `drafts` are the target's answers it corrected).

    report_truncated: the result's `truncated` says which outputs stopped at max_new_tokens before EOS.
    drafts: for an AlignerEnvironment, the target answers to correct (the No fine-tuning answers, as with_corrector
    corrects), instead of the environment's own drafts."""
    prompts = list(prompts)
    cols = _columns(columns, len(prompts))
    if drafts is not None:
        if not callable(getattr(environment, "requests_from_drafts", None)):
            raise ValueError(f"alignfast: argument 'drafts' is for an AlignerEnvironment, got "
                             f"{type(environment).__name__}")
        requests = environment.requests_from_drafts(prompts, list(drafts), cols)
    else:
        requests = environment.policy_requests(prompts, cols, seed=seed)
    got = policy_outputs(policy_engine, policy_tokenizer, requests, max_new_tokens=max_new_tokens,
                         system_prompt=system_prompt, report_truncated=report_truncated)
    outputs, truncated = got if report_truncated else (got, None)
    out = environment.step(prompts, outputs, cols, seed=seed)
    corrected = cols.get("draft") if callable(getattr(environment, "requests_from_drafts", None)) else None
    return ArmResult(name, prompts, list(outputs if rewrites else prompts), [a[0] if a else "" for a in out.answers],
                     _as_floats(out.scores, name, prompts, out.per_func), dict(out.per_func), _samples(out.answers),
                     truncated=truncated, drafts=list(corrected) if corrected is not None else None)


def with_corrector(name: str, environment, corrector, prompts: Sequence[str], columns: dict | None = None, *,
                   answers: Sequence[str] | None = None, seed: int = 0) -> ArmResult:
    """Aligner: the frozen target answers x (the No fine-tuning answers, computed here unless given), the
    corrector rewrites each answer from (x, answer), and the environment's reward scores the correction
    r(x, y) on x. corrector: anything with correct(questions, answers) -> list[str]; one with generate(questions,
    answers) -> Completions (alignfast.aligner.Corrector) also gives the result's `truncated` (corrections that
    stopped at its max_new_tokens, scored as they are)."""
    prompts = list(prompts)
    cols = _columns(columns, len(prompts))
    if answers is None:
        answers = no_fine_tuning(environment, prompts, cols, seed=seed).answers
    truncated = None
    if callable(getattr(corrector, "generate", None)):
        completions = corrector.generate(prompts, list(answers))
        corrections = [c.text for c in completions]
        truncated = [c.truncated for c in completions]
    else:
        corrections = corrector.correct(prompts, list(answers))
    out = environment.rewards(prompts, corrections, **cols)
    return ArmResult(name, prompts, list(prompts), corrections, _as_floats(out.total, name, prompts, out.per_func),
                     dict(out.per_func), truncated=truncated, drafts=list(answers))


def write_rollouts(results: Mapping[str, ArmResult], path: str | Path) -> Path:
    """One JSON line per (arm, prompt): arm, prompt, rewrite, answer, reward, "answers" (all of them, their
    mean reward being "reward") where the target gave several, "truncated" where the arm reports it (the
    answer stopped at its token budget), and "draft" for a corrector arm (the target's answer it corrected); the
    file is replaced whole."""
    lines = []
    for name, r in results.items():
        samples = r.samples or [None] * len(r.prompts)
        cut = r.truncated or [None] * len(r.prompts)
        drafts = r.drafts or [None] * len(r.prompts)
        for prompt, rewrite, answer, score, every, stopped, draft in zip(r.prompts, r.rewrites, r.answers, r.scores,
                                                                         samples, cut, drafts, strict=True):
            row = {"arm": name, "prompt": prompt, "rewrite": rewrite, "answer": answer, "reward": score}
            if draft is not None:
                row["draft"] = draft
            if every is not None:
                row["answers"] = every
            if stopped is not None:
                row["truncated"] = stopped
            lines.append(json.dumps(row) + "\n")
    return write_text_atomically(path, "".join(lines))
