"""Architectures of the toy world's two models: small Llama decoders that run fast on a laptop CPU.

The target must sort, reverse and pick from lists of up to five digits after reading a phrasing of up
to eight words, so it gets a little more depth; the prompter mostly copies its input and chooses a
phrasing, so it can be smaller. Both share the world's word-level vocabulary and tie their embeddings.
"""

from __future__ import annotations

MAX_POSITIONS = 64

TARGET_SHAPE = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)
PROMPTER_SHAPE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4)


def llama_config(tokenizer, shape: dict):
    """A LlamaConfig of the given shape whose special-token ids match `tokenizer`."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
        num_key_value_heads=shape["num_attention_heads"], pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)


def target_config(tokenizer):
    return llama_config(tokenizer, TARGET_SHAPE)


def prompter_config(tokenizer):
    return llama_config(tokenizer, PROMPTER_SHAPE)
