"""Batched chat generation with the toy world's models (used by the build's checks, analysis and tests).

Sampling is plain: temperature only, top-k and top-p off (the world's vocabulary is smaller than
transformers' default top_k of 50 would suggest, but the default would still cut the tail ρsft has).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def chat_texts(tokenizer, messages: Sequence[str]) -> list[str]:
    """Each message as one user turn through the tokenizer's chat template, with the generation prompt."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True,
                                          tokenize=False) for m in messages]


@torch.no_grad()
def generate(model, tokenizer, messages: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
             num_samples: int = 1, seed: int | None = None, batch_size: int = 512) -> list[list[str]]:
    """`num_samples` decoded replies per message (greedy when temperature == 0), in message order.

    With a seed, the result does not depend on the global RNG state: the seed is set before each batch.
    """
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    model.eval()
    texts = chat_texts(tokenizer, messages)
    sample = temperature > 0
    replies: list[list[str]] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        if seed is not None:
            torch.manual_seed(seed + start)
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_k=0 if sample else None,
            top_p=1.0 if sample else None, num_return_sequences=num_samples if sample else 1,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        decoded = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        per = num_samples if sample else 1
        for i in range(len(decoded) // per):
            group = [d.strip() for d in decoded[i * per:(i + 1) * per]]
            replies.append(group if sample else group * num_samples)
    return replies
