"""Supervised fine-tuning of a toy model on (user message, reply) pairs drawn from an endless sampler.

Loss: mean next-token cross-entropy over the reply tokens and the closing EOS only (the chat prefix is
context, labelled -100). Every batch is freshly sampled from a seeded random.Random, so the models see
many lists and learn the operations rather than a fixed corpus. AdamW, linear warm-up, cosine decay to
10 % of the peak learning rate, gradient clipping at 1.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from alignfast.toy.generation import chat_texts

Sampler = Callable[[random.Random], tuple[str, str]]


def encode_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask/labels for chat-formatted (message, reply) pairs."""
    prefixes = tokenizer(chat_texts(tokenizer, [m for m, _ in pairs]), add_special_tokens=False)["input_ids"]
    replies = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    rows = [(p, r + [tokenizer.eos_token_id]) for p, r in zip(prefixes, replies)]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p):n] = torch.tensor(r)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_supervised(model, tokenizer, sampler: Sampler, *, steps: int, batch_size: int, learning_rate: float,
                     seed: int, warmup: int = 100, log_every: int = 0, log=print) -> list[float]:
    """Train `model` in place; returns the loss of every step."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup))
    losses = []
    for step in range(steps):
        batch = encode_batch(tokenizer, [sampler(rng) for _ in range(batch_size)])
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            log(f"  step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}")
    model.eval()
    return losses
