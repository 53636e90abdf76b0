"""Tiny random-weight models and a word-level tokenizer for trainer tests, built from configs,
saved to a directory and loaded back through the real transformers loading code."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from alignfast.rollout.engine import Completion, TargetEngine

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
    "{% else %}<assistant> {{ m['content'] }} <eos> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_tokenizer(path, words: Sequence[str], *, chat_template: bool = True, pad: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    kwargs = {"pad_token": "<pad>"} if pad else {}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                 additional_special_tokens=["<user>", "<assistant>"], **kwargs)
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def llama_config(vocab_size: int, *, hidden: int = 16, layers: int = 1, heads: int = 2, tie: bool = False,
                 num_labels: int = 1, initializer_range: float = 0.02):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=tie, num_labels=num_labels,
                       initializer_range=initializer_range)


def make_causal_lm(path, vocab_size: int, *, seed: int = 0, **kwargs):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config(vocab_size, **kwargs)).save_pretrained(str(path))
    return AutoModelForCausalLM.from_pretrained(str(path))


def make_reward_model(path, vocab_size: int, *, seed: int = 0, **kwargs):
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    torch.manual_seed(seed)
    LlamaForSequenceClassification(llama_config(vocab_size, **kwargs)).save_pretrained(str(path))
    return AutoModelForSequenceClassification.from_pretrained(str(path))


class FunctionTarget(TargetEngine):
    """A frozen 'target' that answers with answer_fn(request text): deterministic environment dynamics.

    Token-id prompts are decoded with `tokenizer` and the chat markers dropped, so the function
    sees the user's request text."""

    def __init__(self, answer_fn: Callable[[str], str], tokenizer=None):
        self.answer_fn = answer_fn
        self.tokenizer = tokenizer
        self.calls = 0

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1, seed=None):
        self.calls += 1
        out = []
        for p in prompts:
            text = p if isinstance(p, str) else self.tokenizer.decode(list(p), skip_special_tokens=True)
            answer = self.answer_fn(text.strip())
            out.append([Completion(text=answer, token_ids=[0] * len(answer.split()), finish_reason="stop")
                        for _ in range(n)])
        return out


WORDS = ["cat", "dog", "bird", "fish", "please", "explain", "briefly", "the", "a", "is", "what", "why", "rewrite",
         "answer", "about"]


def keyword_reward(prompts, completions, **columns):
    """r(x, y): the answer mentions the original prompt's last word (+1), says please (+0.5), is short."""
    out = []
    for x, y in zip(prompts, completions):
        words = y.split()
        out.append(float(x.split()[-1] in words) + 0.5 * float("please" in words) - 0.05 * len(words))
    return out


class Recorder:
    """A callback keeping each step's rollout tokens, update losses and metrics (set .trainer first)."""

    def __init__(self, stop_at: int | None = None):
        self.trainer = None
        self.stop_at = stop_at
        self.responses, self.losses, self.logs = [], [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.responses.append(self.trainer.last_rollout.response_ids.clone())
        self.losses.append(list(self.trainer.last_update_losses))
        if self.stop_at is not None and state.global_step >= self.stop_at:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def small_world(root, *, prompter_seed: int = 0, name: str = "prompter", hidden: int = 16, layers: int = 1):
    """(tokenizer, prompter dir) of the small rewrite world used by the trainer tests (the model's folder `name`,
    of that hidden size and depth)."""
    tok = make_tokenizer(root / "tok", WORDS)
    make_causal_lm(root / name, len(tok), seed=prompter_seed, hidden=hidden, layers=layers)
    tok.save_pretrained(str(root / name))  # a loadable model directory, as users have
    return tok, root / name


TRAIN_PROMPTS = ["what is a cat", "why fish", "explain the dog", "bird", "what is the bird", "a dog"]


def echo_trainer(tok, prompter_dir, *, reward=keyword_reward, peft_config=None, **config):
    """(AlignProTrainer, Recorder): a fresh prompter loaded from prompter_dir, a target that echoes the
    rewrite, `reward` on the small world's prompts; `config` holds the AlignProConfig fields."""
    from transformers import AutoModelForCausalLM

    from alignfast.trainer import AlignProConfig, AlignProTrainer

    rec = Recorder()
    trainer = AlignProTrainer(AlignProConfig(**config), AutoModelForCausalLM.from_pretrained(prompter_dir), tok,
                              FunctionTarget(lambda s: s, tok), reward_funcs=[reward], train_dataset=TRAIN_PROMPTS,
                              callbacks=[rec], peft_config=peft_config)
    rec.trainer = trainer
    return trainer, rec


def assert_runs_agree(rec_a, rec_b, steps: int, metric_keys, *, loss_tol: float = 1e-5, metric_tol: float = 1e-5):
    """Two recorded runs (echo_trainer's recorders) drew the same rollouts at every step, and their losses and the
    logged metrics in `metric_keys` agree to the relative tolerances (float32 rounding between two fast paths)."""
    from tests.utils import relative_error

    for step in range(steps):
        assert torch.equal(rec_a.responses[step], rec_b.responses[step]), f"step {step + 1}: rollouts differ"
        err = relative_error(torch.tensor(rec_a.losses[step], dtype=torch.float64),
                             torch.tensor(rec_b.losses[step], dtype=torch.float64))
        assert err <= loss_tol, f"step {step + 1}: {err:.2e}"
    for key in metric_keys:
        a = torch.tensor([m[key] for m in rec_a.logs], dtype=torch.float64)
        b = torch.tensor([m[key] for m in rec_b.logs], dtype=torch.float64)
        assert relative_error(a, b) <= metric_tol, key
