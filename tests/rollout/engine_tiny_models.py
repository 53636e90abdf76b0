"""Tiny random-weight causal LMs and a tiny tokenizer for the engine tests and the engine benchmark.

The tokenizer is a byte-level BPE trained in memory (so any text encodes) with <pad>=0, <s>=1, </s>=2
and a post-processor that prepends <s>, like Llama's. Models are Llama configs with random weights.
Both are saved to a directory and loaded back through AutoTokenizer / AutoModelForCausalLM, the code
path real checkpoints take.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>"]
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a prompter rewrites the prompt and the frozen target answers it",
    "reward models score the answer against the original question",
    "write a short poem about the sea, the wind and the rain",
    "explain why the sky is blue in one sentence please",
]


def build_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model(vocab_size: int, *, hidden: int = 48, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                max_positions: int = 512, eos_token_id=2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=eos_token_id,
                         pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init at std 0.02 gives near-uniform logits, where greedy ties are decided by rounding; a
    # wider output layer makes the argmax well separated, as in a trained model.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    return model.eval()


def save_tiny(directory: Path, **model_kwargs) -> Path:
    """Tokenizer + model saved to `directory` (created); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(directory)
    build_model(len(tokenizer), **model_kwargs).save_pretrained(directory)
    return directory
