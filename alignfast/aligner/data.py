"""Correction data: rows {question, answer, correction} -> token ids with the loss on the correction only.

One training row becomes

    prompt  = template(question, answer)              (plain text, or a chat user turn if asked)
    target  = correction tokens + EOS                 (the only tokens that carry loss)

tokenized as one text, as the model read text in pre-training (CorrectionEncoder says how the pieces are found),
and a batch is [prompt (left-padded) | target (right-padded)], the layout the PPO engine's policy uses
for [query | response], so the same fused log-prob path scores it.

Too long for max_length: the answer loses tokens from its end first (the corrector still sees the
question, the beginning of the answer and the template's end, e.g. "ASSISTANT:"); if the prompt without
any answer token still leaves no room, the correction loses tokens from its end (its start is always
trained). If the question and template alone leave no room for one correction token, the row is an
error naming max_length.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from alignfast.ops._checks import fail
from alignfast.rollout import templates

FIELDS = ("question", "answer", "correction")
_SENTINEL = "\x00ALIGNFAST-ANSWER\x00"

# How a row becomes token ids. aligner_config.json and the checkpoints record it ("encoding_version") because a
# corrector must be fed the ids it was trained on, and the two give other ids for the same text ('Ġ', 'Paris' against
# 'ĠParis'); a corrector or checkpoint without the field was written before it existed, by the pieces-apart encoding.
PIECES_APART = 1  # the text before the answer, the answer, the text after it and the correction, each tokenized alone
ONE_TEXT = 2  # the text tokenized as one piece (see CorrectionEncoder)
ENCODING_VERSION = ONE_TEXT  # what a new run trains with
ENCODING_VERSIONS = (PIECES_APART, ONE_TEXT)


def check_rows(data, *, name: str = "train_dataset", need_correction: bool = True) -> list[dict]:
    """The rows as dicts with string fields; a missing field, a non-string or an empty question/correction
    is an error naming the row and the field. An empty answer is allowed (an upstream may answer nothing)."""
    if data is None or isinstance(data, (str, bytes, dict)):
        fail(name, f"must be a list of rows {{question, answer, correction}}, got {type(data).__name__}")
    if hasattr(data, "to_list"):  # a datasets.Dataset
        data = data.to_list()
    rows = list(data)
    if not rows:
        fail(name, "is empty")
    fields = FIELDS if need_correction else FIELDS[:2]
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            fail(name, f"row {i} must be a mapping with {', '.join(fields)}, got {type(row).__name__}")
        for f in fields:
            if f not in row or row[f] is None:
                fail(name, f"row {i} has no '{f}' field (rows need {', '.join(fields)})")
            if not isinstance(row[f], str):
                fail(name, f"row {i} field '{f}' must be text, got {type(row[f]).__name__}")
        if not row["question"].strip():
            fail(name, f"row {i} field 'question' is empty")
        if need_correction and not row["correction"].strip():
            fail(name, f"row {i} field 'correction' is empty (an identity row repeats the answer instead)")
        out.append(dict(row))
    return out


def with_identity_rows(rows: list[dict], ratio: float, seed: int) -> list[dict]:
    """rows + K identity rows (correction := answer, "identity": True) with K / (len(rows) + K) = ratio,
    K = round(ratio * n / (1 - ratio)). Sources are drawn without replacement (with, once all are used)
    from rows with a non-empty answer, by a generator seeded with `seed`."""
    if ratio <= 0:
        return list(rows)
    sources = [r for r in rows if r["answer"].strip()]
    if not sources:
        fail("identity_ratio", "needs rows with a non-empty answer to copy")
    k = round(ratio * len(rows) / (1.0 - ratio))
    rng = random.Random(seed)
    picked: list[dict] = []
    while len(picked) < k:
        picked += rng.sample(sources, min(len(sources), k - len(picked)))
    return list(rows) + [{**r, "correction": r["answer"], "identity": True} for r in picked]


@dataclass
class EncodedRow:
    """prompt_ids then target_ids (correction + EOS, the loss tokens); what truncation removed."""

    prompt_ids: list[int]
    target_ids: list[int]
    answer_tokens_dropped: int = 0
    correction_tokens_dropped: int = 0


class PromptText(NamedTuple):
    """The corrector's input as text: the answer is text[answer_start:answer_end]. `moved` is the whitespace (spaces,
    tabs) the rendered template ended with, which belongs to the correction's first token (see CorrectionEncoder)."""

    text: str
    answer_start: int
    answer_end: int
    add_special_tokens: bool
    moved: str


def check_template(template: str, *, name: str = "template", shown: str | None = None) -> None:
    """{question} and {answer} must each appear, {answer} once: the answer is rendered as one marked span (the span
    truncation cuts), and a second {answer} would reach the model as the internal marker. {question} may repeat
    (it is rendered as it is, never cut). `shown`: the setting as the user wrote it ('paper'), for the message."""
    for f in ("{question}", "{answer}"):
        if f not in template:
            fail(name, f"must contain {f}, got {shown or template!r}")
    if template.count("{answer}") > 1:
        fail(name, f"must contain {{answer}} once (the answer is the one span cut to fit max_length), got "
             f"{shown or template!r}")


class CorrectionEncoder:
    """Renders and tokenizes rows for one tokenizer and template (shared by training and inference).

    The token ids are those of the text tokenized as one piece, as the model read text in pre-training: a BPE
    tokenizer writes " Paris" after "| " as one token 'ĠParis', which pieces tokenized apart would split into
    'Ġ', 'Paris'. Trailing spaces of the rendered template ("##Correction: ") are moved to the start of the
    correction, where the tokenizer puts them ('ĠThe'): the prompt would otherwise end in a lone 'Ġ' that no
    pre-training text has, and the correction's first word would be trained without its space. The correction's
    ids are the continuation of the prompt's ids in the tokenization of prompt + correction (when the two do not
    merge across the boundary; else the correction alone). The answer's tokens are found by the fast tokenizer's
    character offsets, so truncation still cuts the answer's own tokens from its end; a tokenizer without offsets
    (not a fast one) gets the template's parts tokenized apart.

    encoding_version=PIECES_APART is the encoding of alignfast before this one, kept for the correctors and
    checkpoints it wrote: the prompt as it was rendered (its trailing space included) in three pieces tokenized
    apart, and the correction tokenized alone."""

    def __init__(self, tokenizer, template: str, *, use_chat_template: bool = False, max_length: int | None = None,
                 encoding_version: int = ENCODING_VERSION):
        check_template(template)
        if isinstance(encoding_version, bool) or encoding_version not in ENCODING_VERSIONS:
            fail("encoding_version", f"must be {PIECES_APART} (the pieces tokenized apart) or {ONE_TEXT} (one text), "
                 f"got {encoding_version!r}")
        if use_chat_template and not templates.has_chat_template(tokenizer):
            # user_turn would fall back to plain text, and aligner_config.json would still say the chat was used
            fail("use_chat_template", f"is true and the tokenizer ({type(tokenizer).__name__}) has no chat template: "
                 "set it false (plain text, as the paper trains) or give a tokenizer with one")
        self.tokenizer = tokenizer
        self.template = template
        self.use_chat_template = use_chat_template
        self.max_length = max_length
        self.encoding_version = encoding_version
        if tokenizer.eos_token_id is None:
            fail("tokenizer", "has no EOS token: the correction must end with one (set tokenizer.eos_token)")
        self.eos_id = int(tokenizer.eos_token_id)
        self._offsets = bool(getattr(tokenizer, "is_fast", False))

    def prompt_text(self, question: str, answer: str) -> PromptText:
        """The corrector's input (plain text, or the chat template's user turn) and where the answer is in it."""
        content = templates.render(self.template, question=question, answer=_SENTINEL)
        text, add_special = templates.user_turn(self.tokenizer, content, use_chat_template=self.use_chat_template)
        before, sep, after = text.partition(_SENTINEL)
        if not sep:  # a chat template that drops the content cannot happen with a sane template
            raise ValueError("alignfast: the corrector's chat template lost the answer")
        full = before + answer + after
        if self.encoding_version == PIECES_APART:  # the rendered text as it is, its trailing space in the prompt
            return PromptText(full, len(before), len(before) + len(answer), add_special, "")
        kept = full.rstrip(" \t")
        start = min(len(before), len(kept))
        return PromptText(kept, start, min(len(before) + len(answer), len(kept)), add_special, full[len(kept):])

    def _ids(self, text: str, add_special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"]) if text else []

    def _prompt_tokens(self, p: PromptText) -> tuple[list[int], int, int]:
        """(ids, lo, hi): the prompt's token ids, the answer's being ids[lo:hi]."""
        if not self._offsets or self.encoding_version == PIECES_APART:
            # no character offsets (or the earlier encoding): the parts apart, special tokens only on the first
            head = self._ids(p.text[: p.answer_start], p.add_special_tokens)
            body = self._ids(p.text[p.answer_start: p.answer_end], False)
            tail = self._ids(p.text[p.answer_end:], False)
            return head + body + tail, len(head), len(head) + len(body)
        enc = self.tokenizer(p.text, add_special_tokens=p.add_special_tokens, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        # The answer's tokens overlap its characters; one that also holds a space before it ('ĠParis') is the
        # answer's. Tokens a post-processor adds (BOS) have the empty span (0, 0) and overlap nothing.
        inside = [i for i, (s, e) in enumerate(enc["offset_mapping"])
                  if max(s, p.answer_start) < min(e, p.answer_end)]
        if not inside:  # an empty answer: nothing to cut
            return ids, len(ids), len(ids)
        return ids, inside[0], inside[-1] + 1

    def prompt_ids(self, question: str, answer: str, *, room: int | None = None) -> tuple[list[int], int]:
        """Token ids of the corrector's input and the number of answer tokens dropped to fit in `room` (the answer's
        tokens are cut from their end; the rest of the prompt is kept)."""
        ids, lo, hi = self._prompt_tokens(self.prompt_text(question, answer))
        dropped = 0
        if room is not None and len(ids) > room:
            keep = max(0, room - (len(ids) - (hi - lo)))
            dropped = hi - lo - keep
            ids = ids[: lo + keep] + ids[hi:]
        return ids, dropped

    def correction_ids(self, prompt: PromptText, correction: str) -> list[int]:
        """The correction's token ids after `prompt` (without EOS)."""
        if self.encoding_version == PIECES_APART:  # tokenized alone, after the prompt's own last piece
            after = prompt.text[prompt.answer_end:]
            text = correction if not after or after[-1].isspace() or self.use_chat_template \
                else " " + correction.lstrip()
            return self._ids(text, False)
        if prompt.moved:
            # The template's trailing spaces open the correction ('ĠThe'), unless it opens with whitespace of its own,
            # which then takes their place: both would be a lone 'Ġ' before it ('Ġ', 'ĠThe'; 'Ġ', 'Ċ', 'The').
            text = correction if correction[:1].isspace() else prompt.moved + correction
        elif not self.use_chat_template and prompt.text and not prompt.text[-1].isspace():
            # "ASSISTANT:" then the correction's first word with its leading space, as a BPE tokenizer writes it
            text = " " + correction.lstrip()
        else:  # after a newline, or the chat template's generation prompt: the correction as it is
            text = correction
        if self._offsets:
            head = self._ids(prompt.text, prompt.add_special_tokens)
            joint = self._ids(prompt.text + text, prompt.add_special_tokens)
            if joint[: len(head)] == head:  # the boundary is a token boundary: the continuation, as one text
                return joint[len(head):]
        return self._ids(text, False)

    def encode(self, row: dict, *, index: int = 0) -> EncodedRow:
        """One training row; see the module docstring for what truncation keeps."""
        target = self.correction_ids(self.prompt_text(row["question"], row["answer"]), row["correction"])
        target = target + [self.eos_id]
        L = self.max_length
        if L is None:
            ids, _ = self.prompt_ids(row["question"], row["answer"])
            return EncodedRow(ids, target)
        bare_len = len(self.prompt_ids(row["question"], row["answer"], room=0)[0])  # every answer token dropped
        if bare_len + 1 > L:
            fail("max_length", f"({L}) leaves no room for the correction of row {index}: its question and the "
                 f"template alone take {bare_len} tokens")
        cut = max(0, bare_len + len(target) - L)  # correction tokens that cannot fit even without the answer
        if cut:
            target = target[: len(target) - cut]
        ids, dropped = self.prompt_ids(row["question"], row["answer"], room=L - len(target))
        return EncodedRow(ids, target, answer_tokens_dropped=dropped, correction_tokens_dropped=cut)

    def inference_ids(self, question: str, answer: str) -> list[int]:
        """The corrector's input at inference: as in training, the answer cut so that at least a quarter of
        max_length stays for the correction (without max_length: untouched)."""
        return self.inference_input(question, answer)[0]

    def inference_input(self, question: str, answer: str) -> tuple[list[int], int]:
        """(inference_ids, how many of the answer's last tokens they leave out)."""
        room = None if self.max_length is None else max(1, self.max_length - max(1, self.max_length // 4))
        return self.prompt_ids(question, answer, room=room)


@dataclass
class Batch:
    """[prompt | target] as [query | response]: query left-padded, response right-padded."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())


def collate(rows: Sequence[EncodedRow], pad_id: int, device=None) -> Batch:
    Q = max(len(r.prompt_ids) for r in rows)
    R = max(len(r.target_ids) for r in rows)
    q = torch.full((len(rows), Q), pad_id, dtype=torch.long)
    qm = torch.zeros((len(rows), Q), dtype=torch.bool)
    r = torch.full((len(rows), R), pad_id, dtype=torch.long)
    rm = torch.zeros((len(rows), R), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row.prompt_ids:
            q[i, Q - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            qm[i, Q - len(row.prompt_ids):] = True
        r[i, : len(row.target_ids)] = torch.tensor(row.target_ids)
        rm[i, : len(row.target_ids)] = True
    return Batch(q.to(device), qm.to(device), r.to(device), rm.to(device))
