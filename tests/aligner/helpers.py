"""A tiny corrector (random-weight Llama over a word-level vocabulary) and correction rows for the Aligner tests."""

from __future__ import annotations

from tests.trainer.tiny import make_causal_lm, make_tokenizer

WORDS = ["cat", "dog", "bird", "fish", "the", "a", "is", "what", "why", "|", "fix", ":", "no", "yes", "big", "small"]
TEMPLATE = "fix {question} | {answer} :"

ROWS = [
    {"question": "what is the cat", "answer": "a dog", "correction": "a cat"},
    {"question": "what is the bird", "answer": "a dog", "correction": "a bird"},
    {"question": "why fish", "answer": "no", "correction": "yes the fish is big"},
    {"question": "what is a dog", "answer": "a dog", "correction": "a dog"},
    {"question": "is the cat small", "answer": "yes the cat is big", "correction": "yes"},
    {"question": "what", "answer": "", "correction": "what is what"},
]


def tiny_corrector(tmp_path, *, seed: int = 0, tie: bool = False, hidden: int = 16, chat_template: bool = False):
    """(model, tokenizer); the model folder (with the tokenizer) is tmp_path / 'corrector'."""
    tok = make_tokenizer(tmp_path / "tok", WORDS, chat_template=chat_template)
    model = make_causal_lm(tmp_path / "corrector", len(tok), seed=seed, hidden=hidden, layers=1, tie=tie)
    tok.save_pretrained(str(tmp_path / "corrector"))
    return model, tok


def bpe_tokenizer(path):
    """A tiny byte-level BPE tokenizer (GPT-2's scheme: a word's leading space is part of its token, 'ĠParis'),
    trained on a few sentences, saved to `path` and loaded back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is the capital of France? Paris is the capital. The capital of France is Paris.",
                             "##Question: ##Answer: ##Correction: | ASSISTANT:"] * 5, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))
