"""Stacked inference: any upstream model answers, the trained corrector rewrites each answer.

    x --(upstream TargetEngine: HF, vLLM or an OpenAI-compatible endpoint)--> y0
      --(corrector, greedy, batched; input template(x, y0) exactly as in training)--> y

The upstream is never touched (open weights or an API); the corrector is a small causal LM saved by
AlignerTrainer.save_model (its aligner_config.json says how its input was built).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from alignfast.aligner.data import ENCODING_VERSION, ENCODING_VERSIONS, PIECES_APART, CorrectionEncoder
from alignfast.ops._checks import fail
from alignfast.rollout import templates
from alignfast.rollout.context import max_positions
from alignfast.rollout.engine import Completion

_log = logging.getLogger("alignfast.aligner")
_warned: set[tuple[str, str]] = set()  # (folder, what): a folder loaded again is not warned about again


def _warn_once(folder: Path, what: str, message: str, *args) -> None:
    key = (str(folder.resolve()), what)
    if key not in _warned:
        _warned.add(key)
        _log.warning(message, folder, *args)


class Corrector:
    """A corrector model behind alignfast's batched HF engine: correct(questions, answers) -> corrections."""

    def __init__(self, model, tokenizer, *, template: str, use_chat_template: bool = False,
                 max_length: int | None = None, max_new_tokens: int = 256, batch_size: int = 32,
                 encoding_version: int = ENCODING_VERSION):
        from alignfast.rollout import HFEngine
        from alignfast.trainer.base import _special_ids

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            fail("max_new_tokens", f"must be an integer >= 1, got {max_new_tokens!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            fail("batch_size", f"must be an integer >= 1, got {batch_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.encoder = CorrectionEncoder(tokenizer, template, use_chat_template=use_chat_template,
                                         max_length=max_length, encoding_version=encoding_version)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.answer_tokens_dropped: list[int] = []  # per row of the last generate(): the answer's end left out
        _, stops = _special_ids(tokenizer, model, None)
        self.engine = HFEngine(model, tokenizer, eos_token_id=stops)

    @staticmethod
    def settings_file(path: str | os.PathLike) -> Path:
        """path/aligner_config.json (how the corrector's input is built), or an error naming 'aligner' if the folder
        has none: cheap, so a command can check a folder before loading any model."""
        p = Path(path)
        if not (p / "aligner_config.json").is_file():
            fail("aligner", f"{p} has no aligner_config.json: pass a folder written by AlignerTrainer.save_model "
                 "(`alignfast aligner train` writes <output_dir>/final)")
        return p / "aligner_config.json"

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device=None, dtype=None, **kwargs) -> Corrector:
        """A folder written by AlignerTrainer.save_model (full weights or a LoRA adapter), its input built as in
        training. A folder from before aligner_config.json recorded encoding_version was trained on the pieces
        tokenized apart, and is fed them (with a warning, once). One saved with use_chat_template true and a tokenizer
        without a chat template was trained on plain text (an earlier alignfast allowed the setting and fell back), and
        reads plain text (with a warning, once)."""
        p = Path(path)
        settings = json.loads(cls.settings_file(p).read_text())
        encoding = settings.get("encoding_version")
        if encoding is None:
            _warn_once(p, "encoding", "%s was saved by an alignfast that did not record how it tokenized its rows "
                       "(aligner_config.json has no encoding_version): its input is tokenized as it was trained, "
                       "the pieces apart (encoding_version 1)")
            encoding = PIECES_APART
        elif isinstance(encoding, bool) or encoding not in ENCODING_VERSIONS:
            fail("aligner", f"{p}/aligner_config.json has encoding_version {encoding!r}, which this alignfast does "
                 f"not know (it knows {', '.join(map(str, ENCODING_VERSIONS))}; written by a newer alignfast?)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if (p / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(str(p), dtype=dtype).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
        if device is not None:
            model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(p))
        use_chat_template = settings.get("use_chat_template", False)
        if use_chat_template and not templates.has_chat_template(tokenizer):
            # Training refuses the setting now; the corrector was trained on user_turn's plain-text fallback.
            _warn_once(p, "chat", "%s: aligner_config.json says use_chat_template: true, and the tokenizer has no chat "
                       "template: the corrector was trained on plain text (by an alignfast that allowed the setting), "
                       "and reads plain text")
            use_chat_template = False
        return cls(model.eval().requires_grad_(False), tokenizer, template=settings["template"],
                   use_chat_template=use_chat_template,
                   max_length=settings.get("max_length"), encoding_version=encoding, **kwargs)

    def correct(self, questions: Sequence[str], answers: Sequence[str]) -> list[str]:
        """Greedy corrections, one per (question, answer) pair."""
        return [c.text for c in self.generate(questions, answers)]

    def generate(self, questions: Sequence[str], answers: Sequence[str]) -> list[Completion]:
        """The greedy corrections as the engine's Completions (text stripped): finish_reason 'length' marks one cut
        at max_new_tokens, which `correct` alone cannot tell from a finished one."""
        questions, answers = list(questions), list(answers)
        if len(questions) != len(answers):
            fail("answers", f"has {len(answers)} entries for {len(questions)} questions")
        out: list[Completion] = []
        dropped: list[int] = []
        for start in range(0, len(questions), self.batch_size):
            encoded = [self.encoder.inference_input(q, a) for q, a in
                       zip(questions[start: start + self.batch_size], answers[start: start + self.batch_size])]
            completions = self.engine.generate([ids for ids, _ in encoded], max_new_tokens=self.max_new_tokens,
                                               temperature=0.0)
            out += [replace(c[0], text=c[0].text.strip()) for c in completions]
            dropped += [cut for _, cut in encoded]
        # Answers longer than the corrector's max_length lose their end (as in training): said, and kept per row.
        self.answer_tokens_dropped = dropped
        if any(dropped):
            _log.warning("%d of %d answers are longer than the corrector's max_length (%s tokens with the question "
                         "and template) allows: their last tokens were left out of its input (%d tokens in all)",
                         sum(d > 0 for d in dropped), len(dropped), self.encoder.max_length, sum(dropped))
        return out


@dataclass
class Correction:
    """truncated: the corrector stopped at its max_new_tokens, not at EOS (the correction is cut).
    answer_truncated: the upstream stopped at upstream_max_new_tokens, not at EOS (the corrector read a cut answer);
    None where the answers were given to the pipeline, not generated by it (it cannot tell)."""

    question: str
    answer: str
    correction: str
    truncated: bool = False
    answer_tokens_dropped: int = 0  # the answer's last tokens the corrector did not see (its max_length)
    answer_truncated: bool | None = None


class AlignerPipeline:
    """upstream (any TargetEngine) -> answers -> corrector -> corrections.

    aligner: a Corrector, or a folder written by AlignerTrainer.save_model, loaded with max_new_tokens (the
    corrector's budget per correction, 256 when not given, as `alignfast correct --max-new-tokens`), dtype, device and
    batch_size; a Corrector carries its own max_new_tokens and dtype, and giving either beside it is an error.
    upstream_tokenizer: when given, the question is sent as token ids in the upstream's chat format (as the PPO
    trainers send the frozen target its prompts); without it (an OpenAI endpoint) the question is sent as text. An
    HFEngine's or a VLLMEngine's own tokenizer is the default: asked in plain text, a chat model answers a prompt it
    was never trained on.
    upstream_system_prompt: the system message before each question, in the upstream tokenizer's chat template
    (an OpenAIEngine carries its own: OpenAIEngine(system_prompt=...)).
    A budget that leaves a local model (the corrector, an HFEngine upstream) no position for its input is an error
    naming it (max_new_tokens, upstream_max_new_tokens), here rather than at the first generation."""

    def __init__(self, upstream, aligner, *, upstream_tokenizer=None, upstream_use_chat_template: bool = True,
                 upstream_system_prompt: str | None = None, upstream_max_new_tokens: int = 256, batch_size: int = 32,
                 max_new_tokens: int | None = None, dtype=None, device=None):
        from alignfast.rollout.engine import TargetEngine
        from alignfast.trainer.align_pro import check_target_room
        from alignfast.trainer.environments import AlignProEnvironment, check_target_system_prompt

        if not isinstance(upstream, TargetEngine):
            fail("upstream", f"must be an alignfast TargetEngine (HFEngine, VLLMEngine, OpenAIEngine), got "
                 f"{type(upstream).__name__}")
        if isinstance(upstream_max_new_tokens, bool) or not isinstance(upstream_max_new_tokens, int) \
                or upstream_max_new_tokens < 1:
            fail("upstream_max_new_tokens", f"must be an integer >= 1, got {upstream_max_new_tokens!r}")
        if upstream_tokenizer is None:
            upstream_tokenizer = upstream.chat_tokenizer
        check_target_system_prompt(upstream, upstream_tokenizer, upstream_system_prompt,
                                   use_chat_template=upstream_use_chat_template, name="upstream_system_prompt",
                                   instead="put the text in the questions instead",
                                   switch="upstream_use_chat_template")
        check_target_room(getattr(upstream, "model", None), upstream_max_new_tokens, name="upstream_max_new_tokens")
        if isinstance(aligner, Corrector):
            for name, value in (("max_new_tokens", max_new_tokens), ("dtype", dtype)):
                if value is not None:  # the Corrector was built with its own: which one wins would be a guess
                    fail(name, f"is a setting of the corrector loaded from a folder; the Corrector given as 'aligner' "
                         f"has its own (Corrector(..., {name}=...)), got {value!r}")
            self.corrector = aligner
        else:
            self.corrector = Corrector.from_pretrained(aligner, device=device, dtype=dtype, batch_size=batch_size,
                                                       max_new_tokens=256 if max_new_tokens is None
                                                       else max_new_tokens)
            # The corrector's budget in the caller's terms: the engine's own error, at the first generation, named
            # the 'max_new_tokens' argument of its generate() (256 by default here, never passed by the caller). A
            # Corrector given whole is the caller's, its budget its own argument (and may be set before it runs).
            positions = max_positions(self.corrector.model)
            if positions is not None and self.corrector.max_new_tokens >= positions:
                budget = f"{self.corrector.max_new_tokens}" + (", the default" if max_new_tokens is None else "")
                fail("max_new_tokens", f"({budget}) leaves no room for the corrector's input: its "
                     f"max_position_embeddings is {positions}")
        # The upstream's answer to the question as it is: Align-Pro's target call with the identity rewrite.
        self._upstream = AlignProEnvironment(upstream, None, target_tokenizer=upstream_tokenizer,
                                             rewrite_template="{prompt}", max_new_tokens=upstream_max_new_tokens,
                                             batch_size=batch_size, use_chat_template=upstream_use_chat_template,
                                             system_prompt=upstream_system_prompt)

    def answer(self, questions: Sequence[str], *, seed: int | None = 0) -> list[str]:
        """The upstream's answers (stripped)."""
        return [c.text for c in self.upstream_completions(questions, seed=seed)]

    def upstream_completions(self, questions: Sequence[str], *, seed: int | None = 0) -> list[Completion]:
        """The upstream's answers as Completions (text stripped): finish_reason 'length' marks one cut at
        upstream_max_new_tokens."""
        completions, _ = self._upstream.completions(list(questions), seed=seed)
        return [c[0] if c else Completion("", [], "stop") for c in completions]

    def __call__(self, questions: Sequence[str], *, answers: Sequence[str] | None = None,
                 seed: int | None = 0) -> list[Correction]:
        """Corrections of the upstream's answers (or of `answers`, when already known: answer_truncated is then
        None)."""
        questions = list(questions)
        if answers is None:
            upstream = self.upstream_completions(questions, seed=seed)
            answers = [c.text for c in upstream]
            cut: list[bool | None] = [c.truncated for c in upstream]
        else:
            answers, cut = list(answers), [None] * len(questions)
        corrections = self.corrector.generate(questions, answers)
        return [Correction(q, a, c.text, truncated=c.truncated, answer_tokens_dropped=d,
                           answer_truncated=u)
                for q, a, c, d, u in zip(questions, answers, corrections, self.corrector.answer_tokens_dropped, cut,
                                         strict=True)]
