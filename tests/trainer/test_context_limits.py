"""What fits in each model's context: impossible settings are one-line errors, cut data a counted warning."""

import logging

import pytest

from alignfast.ops import AlignfastArgumentError
from tests.trainer.tiny import WORDS, echo_trainer, make_reward_model, make_tokenizer, small_world


def test_response_length_beyond_the_prompters_positions_is_refused(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    with pytest.raises(AlignfastArgumentError, match=r"argument 'response_length' \(300\) leaves no room for the "
                                                     r"prompter's input: its max_position_embeddings is 256"):
        echo_trainer(tok, prompter_dir, output_dir=str(tmp_path / "o"), response_length=300)
    with pytest.raises(AlignfastArgumentError, match=r"argument 'max_prompt_length' \(250\) plus response_length"):
        echo_trainer(tok, prompter_dir, output_dir=str(tmp_path / "o"), response_length=8, max_prompt_length=250)


def test_a_cut_prompter_input_is_counted_once(tmp_path, caplog):
    tok, prompter_dir = small_world(tmp_path)
    trainer, _ = echo_trainer(tok, prompter_dir, output_dir=str(tmp_path / "o"), response_length=2,
                              max_prompt_length=4, rewrite_template="rewrite please the answer about {prompt}")
    with caplog.at_level(logging.WARNING, logger="alignfast"):
        trainer.rollout(["what is a cat", "bird"])
        trainer.rollout(["what is a cat"])
    cut = [r.message for r in caplog.records if "keep their last" in r.message]
    assert len(cut) == 1 and cut[0].startswith("2 of 2 prompter's inputs are longer than 4 tokens")
    assert "rewrite instruction" in cut[0]


def test_another_models_tokenizer_is_refused_at_construction(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    big = make_tokenizer(tmp_path / "big", WORDS + [f"w{i}" for i in range(40)])
    with pytest.raises(AlignfastArgumentError, match=r"argument 'prompter_tokenizer' has 61 tokens but the "
                                                     r"prompter's input embeddings hold 21"):
        echo_trainer(big, prompter_dir, output_dir=str(tmp_path / "o"))


def test_the_reward_model_sees_the_end_of_a_long_exchange_with_a_warning(tmp_path, caplog):
    from alignfast.rollout.rewards import RewardModel

    tok = make_tokenizer(tmp_path / "tok", WORDS, chat_template=False)
    rm = RewardModel(make_reward_model(tmp_path / "rm", len(tok)), tok)
    long = " ".join(["cat"] * 400)
    with caplog.at_level(logging.WARNING, logger="alignfast"):
        scores = rm([long, "a"], ["dog", "cat"])
        rm([long], ["dog"])
    assert len(scores) == 2
    cut = [r.message for r in caplog.records if "keep their last" in r.message]
    assert len(cut) == 1 and cut[0].startswith("1 of 2 reward-model exchanges are longer than 256 tokens")
    big = make_tokenizer(tmp_path / "big", WORDS + [f"w{i}" for i in range(40)])
    with pytest.raises(AlignfastArgumentError, match="argument 'reward_tokenizer' has 61 tokens"):
        RewardModel(rm.model, big)


class _Embeddings:
    def __init__(self, rows):
        self.num_embeddings = rows


class _Shaped:
    """A model as check_vocabulary sees it: its embedding rows and its config's special ids."""

    def __init__(self, rows, **ids):
        from types import SimpleNamespace

        self.config = SimpleNamespace(**{f"{k}_token_id": ids.get(k) for k in ("eos", "bos", "pad")})
        self.rows = rows

    def get_input_embeddings(self):
        return _Embeddings(self.rows)


class _Tokenizer:
    def __init__(self, size, **ids):
        self.size = size
        for k in ("eos", "bos", "pad"):
            setattr(self, f"{k}_token_id", ids.get(k))

    def __len__(self):
        return self.size


@pytest.mark.parametrize("tokens, rows, tok_ids, model_ids", [
    (151665, 151936, {"eos": 151645, "pad": 151643}, {"eos": 151645, "bos": 151643}),  # Qwen2.5-Instruct
    (151665, 152064, {"eos": 151643, "pad": 151643}, {"eos": 151643, "bos": 151643}),  # Qwen2.5-7B
    (128256, 128256, {"eos": 128009, "bos": 128000}, {"eos": [128001, 128008, 128009], "bos": 128000}),  # Llama 3.1
    (50295, 51200, {"eos": 50256, "bos": 50256}, {"eos": 50256, "bos": 50256}),  # Phi-2
    (100015, 102400, {"eos": 100001, "bos": 100000}, {"eos": 100001, "bos": 100000}),  # DeepSeek-V2
    (49152, 49152, {"eos": 2, "bos": 1, "pad": 2}, {"eos": 2, "bos": 1, "pad": 2}),  # SmolLM2-Instruct
    (51, 64, {"eos": 3, "bos": 2, "pad": 0}, {"eos": 3, "bos": 2, "pad": 0}),  # a tiny vocabulary padded to 64
    (32000, 32000, {"eos": 2, "bos": 1, "pad": 2}, {"eos": 2, "bos": 1, "pad": 0}),  # pad_token = eos_token
])
def test_real_shaped_embedding_padding_is_no_warning(caplog, tokens, rows, tok_ids, model_ids):
    from alignfast.rollout.context import check_vocabulary

    with caplog.at_level(logging.WARNING, logger="alignfast"):
        check_vocabulary(_Shaped(rows, **model_ids), _Tokenizer(tokens, **tok_ids), "tokenizer", "corrector",
                         "aligner.tokenizer")
    assert not caplog.records


@pytest.mark.parametrize("tokens, tok_ids, problem", [
    (51, {"eos": 2, "bos": 1, "pad": 0}, "it has 51 tokens for the corrector's 220 embedding rows"),
    (220, {"eos": 3, "bos": 1, "pad": 0}, "its eos token id is 3, the model config's 2"),
    (220, {"eos": 2, "bos": 1, "pad": 5}, "its pad token id is 5, the model config's 0"),
])
def test_a_smaller_tokenizer_of_another_model_is_a_warning_naming_the_setting(caplog, tokens, tok_ids, problem):
    """A tokenizer smaller than the embeddings was accepted silently: the toy target's 51 tokens with a 220-row model
    (other EOS and BOS ids) trained and exited 0. Special ids other than the model config's, or far more rows than
    padding explains, are now a warning naming the setting."""
    from alignfast.rollout.context import check_vocabulary

    with caplog.at_level(logging.WARNING, logger="alignfast"):
        check_vocabulary(_Shaped(220, eos=2, bos=1, pad=0), _Tokenizer(tokens, **tok_ids), "tokenizer", "corrector",
                         "aligner.tokenizer")
    [record] = caplog.records
    assert record.getMessage().startswith("argument 'tokenizer' may be another model's tokenizer, not the corrector's")
    assert problem in record.getMessage() and "(aligner.tokenizer in a run file)" in record.getMessage()
