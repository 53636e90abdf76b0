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


# Families whose eager attention, in float64, turned a left pad into NaN logits for the padded rows' real tokens
# (alignfast.rollout._pad_mask): name -> (config class, model class, extra config). The window is 4 tokens, so the
# tests' pads are both narrower and wider than it; a family given layer_types mixes sliding and full layers.
# Mixtral and gpt-oss are left out: their expert matmuls refuse float64 (and float32 never gave NaN).
_HYBRID = {"layer_types": ["sliding_attention", "full_attention"]}
SLIDING_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),  # no sliding window: the failure is not about windows
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 12, "sliding_window": 4}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 12, "sliding_window": 4, **_HYBRID}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"sliding_window": 4, "use_sliding_window": True,
                                                  "max_window_layers": 0}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 12, "sliding_window": 4, "use_sliding_window": True,
                                                  "max_window_layers": 1}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {"sliding_window": 4}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 4}),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", {"sliding_window": 4, **_HYBRID}),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", {"sliding_window": 4, **_HYBRID}),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", {"sliding_window": 4, **_HYBRID}),
    "vaultgemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", {"head_dim": 12, "sliding_window": 4, **_HYBRID}),
}


def build_family_model(family: str, *, vocab_size: int = 64, attn_implementation: str = "eager",
                       dtype: torch.dtype = torch.float64, seed: int = 0):
    """A tiny random model of a SLIDING_FAMILIES family (2 layers, hidden 48), its linear weights scaled up 3x so
    that greedy choices are well separated; pytest.skip when this transformers lacks the family."""
    import pytest
    import transformers

    config_name, model_name, extra = SLIDING_FAMILIES[family]
    if not hasattr(transformers, config_name) or not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)._from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model.to(dtype).eval()
