"""Prompt building: the prompter's rewrite instruction, the target's input, the reward model's input.

Each model may have its own tokenizer and chat template. A chat template already holds the special
tokens it wants (BOS, role markers), so text rendered from one is tokenized with
add_special_tokens=False; plain text (a tokenizer without a chat template) gets the tokenizer's usual
special tokens. Templates are filled with str.replace on the named fields only, so braces in
prompts or in the rest of a template (JSON examples, code) are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def render(template: str, **fields: str) -> str:
    """Replace each '{name}' in `template` by fields[name], in one pass (a value that itself contains
    '{prompt}' is not expanded again); nothing else is interpreted."""
    if not fields:
        return template
    pattern = re.compile("|".join(re.escape("{" + name + "}") for name in fields))
    return pattern.sub(lambda m: fields[m.group(0)[1:-1]], template)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def user_turn(tokenizer, user_text: str, *, use_chat_template: bool = True) -> tuple[str, bool]:
    """(text, add_special_tokens) asking the model to answer `user_text` as the assistant."""
    if use_chat_template and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
        return text, False
    return user_text, True


def user_turn_ids(tokenizer, user_text: str, *, use_chat_template: bool = True,
                  max_length: int | None = None) -> list[int]:
    """Token ids of `user_turn`; with max_length, only the last max_length ids (the end holds the
    generation prompt, which must survive truncation)."""
    text, add_special = user_turn(tokenizer, user_text, use_chat_template=use_chat_template)
    ids = list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
    if max_length is not None and len(ids) > max_length:
        ids = ids[-max_length:]
    return ids


def exchange(tokenizer, prompt: str, completion: str, *, fallback_template: str = "{prompt}\n{completion}",
             use_chat_template: bool = True) -> tuple[str, bool]:
    """(text, add_special_tokens) of a finished user/assistant exchange, for a reward model."""
    if use_chat_template and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False)
        return text, False
    return render(fallback_template, prompt=prompt, completion=completion), True


def rewrite_instructions(template: str, prompts: Sequence[str]) -> list[str]:
    """The prompter's user message for each original prompt x."""
    return [render(template, prompt=p) for p in prompts]


def target_requests(template: str, prompts: Sequence[str], rewrites: Sequence[str]) -> list[str]:
    """The target's user message for each rewrite x' (the template may also quote the original x)."""
    return [render(template, rewrite=r, prompt=p) for p, r in zip(prompts, rewrites, strict=True)]
