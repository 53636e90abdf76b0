"""Prompt building: the prompter's rewrite instruction, the target's input, the reward model's input.

Each model may have its own tokenizer and chat template. A chat template already holds the special
tokens it wants (BOS, role markers), so text rendered from one is tokenized with
add_special_tokens=False; plain text (a tokenizer without a chat template) gets the tokenizer's usual
special tokens. Templates are filled with str.replace on the named fields only, so braces in
prompts or in the rest of a template (JSON examples, code) are left alone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

_log = logging.getLogger("alignfast")


def render(template: str, **fields: str) -> str:
    """Replace each '{name}' in `template` by fields[name], in one pass (a value that itself contains
    '{prompt}' is not expanded again); nothing else is interpreted."""
    if not fields:
        return template
    pattern = re.compile("|".join(re.escape("{" + name + "}") for name in fields))
    return pattern.sub(lambda m: fields[m.group(0)[1:-1]], template)


_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def warn_unknown_fields(setting: str, template: str, fields: Sequence[str]) -> list[str]:
    """A '{name}' in `template` that is none of its `fields` is sent as text (render replaces only the fields, so
    JSON examples and code stay intact): a typo such as '{promt}', or a data column the template cannot reach, is
    said once, naming the setting and the fields it has. Returns the unknown names."""
    unknown = sorted({m.group(1) for m in _FIELD.finditer(template)} - set(fields))
    if unknown:
        _log.warning(
            "%s: %s %s not a field and will reach the model as text (its fields: %s)", setting,
            ", ".join("{" + n + "}" for n in unknown), "is" if len(unknown) == 1 else "are",
            ", ".join("{" + f + "}" for f in fields))
    return unknown


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _messages(user_text: str, system_prompt: str | None) -> list[dict]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return [*system, {"role": "user", "content": user_text}]


def user_turn(tokenizer, user_text: str, *, use_chat_template: bool = True,
              system_prompt: str | None = None) -> tuple[str, bool]:
    """(text, add_special_tokens) asking the model to answer `user_text` as the assistant; system_prompt (checked
    beforehand by check_system_prompt) is the chat's system message before it."""
    if use_chat_template and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(_messages(user_text, system_prompt), tokenize=False,
                                             add_generation_prompt=True)
        return text, False
    return user_text, True


TARGET_TEMPLATE_HINT = "put the text in target_prompt_template instead"


def check_system_prompt(tokenizer, system_prompt: str | None, *, use_chat_template: bool, name: str,
                        instead: str = TARGET_TEMPLATE_HINT, switch: str = "target_use_chat_template") -> None:
    """A system message exists only in a chat template, and some templates refuse one (Gemma's raises) or drop it
    (templates that loop over user/assistant turns only): each case is an error naming `name`, found once here
    rather than as a target that silently never saw the instruction. instead: what the caller can do instead (the
    Align-Pro target's is its target_prompt_template); switch: the caller's name of use_chat_template."""
    if system_prompt is None:
        return
    from alignfast.ops._checks import fail, optional_text

    optional_text(name, system_prompt)
    if tokenizer is None:
        return  # plain text to an endpoint that formats its own input: the engine carries it (OpenAIEngine)
    if not use_chat_template:
        fail(name, f"is a chat's system message, and the chat template is switched off ({switch} false): switch it "
             f"on, or {instead}")
    if not has_chat_template(tokenizer):
        fail(name, f"is a chat's system message, and the tokenizer ({type(tokenizer).__name__}) has no chat "
             f"template: {instead}")
    try:
        text = tokenizer.apply_chat_template(_messages("?", system_prompt), tokenize=False, add_generation_prompt=True)
    except Exception as err:  # jinja2's TemplateError ("System role not supported") or the template's own raise
        reason = (str(err).splitlines() or [type(err).__name__])[0].strip("'\"")
        fail(name, f"is refused by the tokenizer's chat template ({reason}): {instead}")
    if system_prompt.strip() not in text:
        fail(name, f"is dropped by the tokenizer's chat template (the rendered chat does not contain it): {instead}")


def user_turn_ids(tokenizer, user_text: str, *, use_chat_template: bool = True, max_length: int | None = None,
                  system_prompt: str | None = None) -> list[int]:
    """Token ids of `user_turn`; with max_length, only the last max_length ids (the end holds the
    generation prompt, which must survive truncation)."""
    text, add_special = user_turn(tokenizer, user_text, use_chat_template=use_chat_template,
                                  system_prompt=system_prompt)
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
