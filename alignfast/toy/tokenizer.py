"""The toy world's word-level tokenizer: one id per word, built with the `tokenizers` library and wrapped
as a transformers fast tokenizer so AutoTokenizer.from_pretrained and apply_chat_template work on it.

Text is split on whitespace; every word of the world's language has its own id (unknown words map to
<unk>). No token is added automatically: the chat template writes the role markers itself, and the
assistant's turn ends with the EOS token, which is what generation stops on:

    <|user|> sort 4 1 3 <|assistant|> 1 3 4 </s>
"""

from __future__ import annotations

from alignfast.toy.tasks import vocabulary_words

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, *ROLE_TOKENS)

REWRITE_TEMPLATE = "rewrite the prompt : {prompt}"
TEMPLATE_WORDS = ("rewrite", "the", "prompt", ":")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def vocabulary() -> list[str]:
    """Special tokens first (so their ids are stable: <pad>=0, <unk>=1, <s>=2, </s>=3), then words."""
    words = sorted(set(vocabulary_words()) | set(TEMPLATE_WORDS))
    return [*SPECIAL_TOKENS, *words]


def build_tokenizer():
    """A PreTrainedTokenizerFast over vocabulary(), with pad/eos/unk/bos, the chat template, left padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        additional_special_tokens=list(ROLE_TOKENS), clean_up_tokenization_spaces=False,
        padding_side="left", model_max_length=64)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer, folder) -> None:
    """save_pretrained, then make tokenizer_config.json readable by transformers 4.x as well as 5.x:
    transformers 5 writes its own class name (TokenizersBackend) and a list-valued extra_special_tokens,
    which 4.x rejects; both read the classic PreTrainedTokenizerFast / additional_special_tokens form."""
    import json
    from pathlib import Path

    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.pop("backend", None)
    config.pop("extra_special_tokens", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = list(ROLE_TOKENS)
    config["chat_template"] = CHAT_TEMPLATE  # transformers < 4.50 reads it only from here
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def chat_prompt(content: str) -> str:
    """The text the chat template makes of one user turn plus the generation prompt (without jinja)."""
    return f"<|user|> {content} <|assistant|>"
