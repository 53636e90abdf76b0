"""The word-level tokenizer: round trips, special tokens, chat template, and the shipped copy loads."""

import pytest

from alignfast.toy.tasks import EXPLICIT_PHRASINGS, TASKS, explicit_prompt, make_prompts
from alignfast.toy.tokenizer import REWRITE_TEMPLATE, build_tokenizer, chat_prompt, save_tokenizer, vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _world_texts():
    rows = make_prompts(50, seed=0, held_out=False)
    texts = [r["prompt"] for r in rows] + [r["answer"] for r in rows]
    texts += [REWRITE_TEMPLATE.format(prompt=r["prompt"]) for r in rows]
    texts += [explicit_prompt(op, [3, 0, 9, 5], v) for op, ps in EXPLICIT_PHRASINGS.items() for v in range(len(ps))]
    return texts


def test_round_trip_without_unknown_words(tokenizer):
    for text in _world_texts():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert len(ids) == len(text.split())
        assert tokenizer.decode(ids) == text


def test_special_tokens(tokenizer):
    assert len(tokenizer) == len(vocabulary()) < 200
    ids = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id}
    assert None not in ids and len(ids) == 4
    assert tokenizer("sort 4 1 3")["input_ids"] == tokenizer("sort 4 1 3", add_special_tokens=False)["input_ids"]
    assert tokenizer("banana")["input_ids"] == [tokenizer.unk_token_id]
    ids = tokenizer("<|user|> sort 4 <|assistant|> 4 </s>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "sort 4 4"


def test_chat_template(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "sort 4 1 3"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == chat_prompt("sort 4 1 3") == "<|user|> sort 4 1 3 <|assistant|>"
    turn = tokenizer.apply_chat_template([{"role": "user", "content": "max 4 1"},
                                          {"role": "assistant", "content": "4"}], tokenize=False)
    assert tokenizer(turn, add_special_tokens=False)["input_ids"][-1] == tokenizer.eos_token_id


def test_left_padding(tokenizer):
    batch = tokenizer(["sort 4 1 3", "max 4"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1, 0].item() == tokenizer.pad_token_id
    assert batch["attention_mask"][1].tolist() == [0, 0, 1, 1]


def test_saved_tokenizer_loads_through_auto_tokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tokenizer, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.pad_token == "<pad>" and loaded.eos_token == "</s>" and loaded.padding_side == "left"
    for text in _world_texts()[:20]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    message = [{"role": "user", "content": "rank 1 2 3"}]
    assert loaded.apply_chat_template(message, add_generation_prompt=True, tokenize=False) == \
        tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=False)


def test_task_words_are_single_tokens(tokenizer):
    for task in TASKS:
        assert len(tokenizer(task.word, add_special_tokens=False)["input_ids"]) == 1
