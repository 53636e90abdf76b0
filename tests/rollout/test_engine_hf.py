"""HFEngine against per-prompt `model.generate`, and its batching, padding, EOS, n, seed and prompt rules.

Models are tiny random Llamas loaded from disk. Exact-equality tests run the model in float64 so that
batched and single-prompt runs cannot differ by rounding (the batched attention sums over padded
widths in a different order); one test checks float32 as loaded.
"""

from __future__ import annotations

import pytest
import torch

from alignfast.ops import AlignfastArgumentError
from alignfast.rollout import HFEngine
from tests.rollout.engine_tiny_models import build_model, save_tiny

PROMPTS = [
    "the quick brown fox",
    "a prompter rewrites the prompt and the frozen target answers it, then the reward model scores it",
    "write",
    "the quick brown fox",  # duplicate
    "explain why the sky is blue",
    "reward models score the answer against the original question and the frozen target",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model64(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()


def reference_generate(model, tokenizer, prompt: str, max_new_tokens: int, eos=None) -> list[int]:
    """Per-prompt greedy `model.generate`, cut after the first EOS (generate pads after it)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    kwargs = {} if eos is None else {"eos_token_id": eos}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0, **kwargs)[0, ids.shape[1]:].tolist()
    eos_set = set([eos] if isinstance(eos, int) else (eos or [model.generation_config.eos_token_id]))
    for i, t in enumerate(out):
        if t in eos_set:
            return out[:i + 1]
    return out


# (max_batch_tokens, prefill_chunk_tokens, packed_cache): one batch / many small batches, one prefill
# chunk per batch / many, the preallocated cache / the DynamicCache fallback
LAYOUTS = [(100_000, 100_000, True), (64, 100_000, True), (100_000, 40, True), (300, 1, True),
           (100_000, 100_000, False), (64, 40, False)]


@pytest.mark.parametrize("max_batch_tokens,prefill_chunk_tokens,packed_cache", LAYOUTS)
def test_engine_greedy_matches_per_prompt_generate(model64, tokenizer, max_batch_tokens, prefill_chunk_tokens,
                                                   packed_cache):
    engine = HFEngine(model64, tokenizer, max_batch_tokens=max_batch_tokens,
                      prefill_chunk_tokens=prefill_chunk_tokens, packed_cache=packed_cache)
    got = engine.generate(PROMPTS, max_new_tokens=10)
    assert len(got) == len(PROMPTS)
    for prompt, completions in zip(PROMPTS, got):
        want = reference_generate(model64, tokenizer, prompt, 10)
        assert [c.token_ids for c in completions] == [want]
        assert completions[0].text == tokenizer.decode(want, skip_special_tokens=True)
        assert completions[0].finish_reason == ("stop" if want[-1] == 2 else "length")


def test_engine_greedy_float32_as_loaded(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    engine = HFEngine(model, tokenizer)
    got = engine.generate(PROMPTS, max_new_tokens=8)
    for prompt, completions in zip(PROMPTS, got):
        assert completions[0].token_ids == reference_generate(model, tokenizer, prompt, 8)


def test_engine_loads_from_path(tiny_dir, model64, tokenizer):
    engine = HFEngine(str(tiny_dir), dtype=torch.float64, device="cpu")
    assert engine.model is not model64 and engine.model.dtype == torch.float64
    assert not engine.model.training and not any(p.requires_grad for p in engine.model.parameters())
    assert engine.model.config._attn_implementation == "sdpa"
    got = engine.generate(PROMPTS[:3], max_new_tokens=6)
    want = HFEngine(model64, tokenizer).generate(PROMPTS[:3], max_new_tokens=6)
    assert [[c.token_ids for c in r] for r in got] == [[c.token_ids for c in r] for r in want]


def test_engine_loads_a_model_without_sdpa_from_path(tmp_path, tokenizer):
    """HFEngine(path) forced attn_implementation="sdpa", so a model transformers has no SDPA attention for
    (Gemma-2 here) failed to load at all. transformers now chooses (eager for Gemma-2), and it generates as
    per-prompt `generate` does, batched: in float64 its eager attention once gave NaN for every left-padded row
    (alignfast.rollout._pad_mask; not a matter of the sliding window, which is narrower than some pads here)."""
    import transformers as tf

    config = tf.Gemma2Config(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                             hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=12, max_position_embeddings=256, sliding_window=16)
    torch.manual_seed(3)
    tf.Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = HFEngine(str(tmp_path), dtype=torch.float64, device="cpu")
    from packaging.version import Version

    if Version(tf.__version__) >= Version("5.21"):  # earlier releases give Gemma-2 sdpa (no NaN to guard there)
        assert engine.model.config._attn_implementation == "eager"
    got = engine.generate(PROMPTS, max_new_tokens=6)
    lengths = [len(ids) for ids in tokenizer(PROMPTS).input_ids]
    assert max(lengths) - min(lengths) > config.sliding_window  # the shortest prompt's pad is wider than the window
    for prompt, completions in zip(PROMPTS, got):
        assert completions[0].token_ids == reference_generate(engine.model, tokenizer, prompt, 6)


def test_engine_peft_wrapped_target_matches_its_generate(tokenizer):
    """A PEFT-wrapped model was refused ("PeftModelForCausalLM.forward takes no position_ids"): the check read
    the wrapper's forward, which takes **kwargs and passes position_ids on to the base model. The base model's
    signature is read now, as for the cache keyword, and the adapted model decodes as its own `generate`."""
    peft = pytest.importorskip("peft")

    base = build_model(len(tokenizer)).to(torch.float64)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                             init_lora_weights=False)  # random B: the adapter changes the outputs
    model = peft.get_peft_model(base, config).eval()
    got = HFEngine(model, tokenizer).generate(PROMPTS, max_new_tokens=6)
    for prompt, completions in zip(PROMPTS, got):
        assert completions[0].token_ids == reference_generate(model, tokenizer, prompt, 6)
    with model.disable_adapter():
        assert [r[0].token_ids for r in HFEngine(model, tokenizer).generate(PROMPTS, max_new_tokens=6)] != \
            [r[0].token_ids for r in got]


def test_engine_eos_stops_rows_and_matches_generate(model64, tokenizer):
    """Pick EOS ids that the greedy outputs actually emit mid-way, several of them (a list, as in
    generation_config), and check each row stops at the first one, as generate does."""
    free = HFEngine(model64, tokenizer, eos_token_id=[]).generate(PROMPTS, max_new_tokens=12)
    eos = sorted({free[0][0].token_ids[3], free[1][0].token_ids[5]})
    engine = HFEngine(model64, tokenizer, eos_token_id=eos, max_batch_tokens=128)
    got = engine.generate(PROMPTS, max_new_tokens=12)
    stopped = 0
    for prompt, completions in zip(PROMPTS, got):
        c = completions[0]
        assert c.token_ids == reference_generate(model64, tokenizer, prompt, 12, eos=eos)
        assert not any(t in eos for t in c.token_ids[:-1])
        if c.finish_reason == "stop":
            stopped += 1
            assert c.token_ids[-1] in eos and len(c.token_ids) <= 12
        else:
            assert len(c.token_ids) == 12
    assert stopped >= 2


@pytest.mark.parametrize("compact_fraction", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_retirement_policy_does_not_change_outputs(model64, tokenizer, compact_fraction, temperature):
    """Finished rows dropped at once, in bulk, or never: the same completions."""
    free = HFEngine(model64, tokenizer, eos_token_id=[]).generate(PROMPTS, max_new_tokens=12)
    eos = sorted({r[0].token_ids[i] for r, i in zip(free, (2, 4, 6, 8, 1, 3))})
    kw = dict(max_new_tokens=12, temperature=temperature, n=3, seed=4)
    want = HFEngine(model64, tokenizer, eos_token_id=eos, packed_cache=False, max_batch_size=1).generate(PROMPTS, **kw)
    got = HFEngine(model64, tokenizer, eos_token_id=eos, compact_fraction=compact_fraction).generate(PROMPTS, **kw)
    assert got == want
    assert sum(c.finish_reason == "stop" for r in got for c in r) >= 6


def test_engine_sliding_window_model_uses_fallback_cache(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    from alignfast.rollout._kv_cache import packed_cache_layers

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                           max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(1)
    model = MistralForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    assert packed_cache_layers(model) == 0
    got = HFEngine(model, tokenizer).generate(PROMPTS, max_new_tokens=10)
    for prompt, completions in zip(PROMPTS, got):
        assert completions[0].token_ids == reference_generate(model, tokenizer, prompt, 10)


def test_engine_hybrid_linear_attention_model_copies_and_drops_rows(tokenizer):
    """Hybrid models (a linear-attention or conv layer beside attention: LFM2 here, also Qwen3-Next, Jamba, Bamba,
    RecurrentGemma) crashed with AttributeError ('LinearAttentionLayer' has no batch_select_indices) when n > 1
    samples copied a prompt's cache rows or finished rows were dropped. Rows are gathered with reorder_cache now,
    and the samples equal those of a run that never touches cache rows (no dedupe, no dropping)."""
    from collections import Counter

    import transformers as tf

    if not hasattr(tf, "Lfm2Config"):
        pytest.skip("this transformers has no LFM2")
    config = tf.Lfm2Config(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                           hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, layer_types=["conv", "full_attention"])
    torch.manual_seed(0)
    model = tf.Lfm2ForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(5.0)
    kw = dict(max_new_tokens=8, temperature=1.0, n=3, seed=1)
    free = HFEngine(model, tokenizer, eos_token_id=[]).generate(PROMPTS, **kw)
    eos = [t for t, _ in Counter(t for r in free for c in r for t in c.token_ids).most_common(4)]  # rows stop
    plain = HFEngine(model, tokenizer, eos_token_id=eos, dedupe=False, compact_fraction=1.0).generate(PROMPTS, **kw)
    for compact_fraction in (0.0, 0.5):
        got = HFEngine(model, tokenizer, eos_token_id=eos, compact_fraction=compact_fraction).generate(PROMPTS, **kw)
        assert got == plain
    assert sum(c.finish_reason == "stop" for r in plain for c in r) >= 6
    greedy = HFEngine(model, tokenizer, eos_token_id=eos, compact_fraction=0.0).generate(PROMPTS, max_new_tokens=8)
    for prompt, completions in zip(PROMPTS, greedy):
        assert completions[0].token_ids == reference_generate(model, tokenizer, prompt, 8, eos=eos)


def test_engine_eos_from_generation_config_list(tokenizer):
    model = build_model(len(tokenizer)).to(torch.float64)
    free = HFEngine(model, tokenizer, eos_token_id=[]).generate(PROMPTS[:2], max_new_tokens=8)
    model.generation_config.eos_token_id = [2, free[0][0].token_ids[2]]
    engine = HFEngine(model, tokenizer)
    assert engine.eos_token_ids == model.generation_config.eos_token_id
    c = engine.generate(PROMPTS[:1], max_new_tokens=8)[0][0]
    assert c.token_ids == free[0][0].token_ids[:3] and c.finish_reason == "stop"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_padding_never_leaks(model64, tokenizer, temperature):
    """A short prompt batched beside long ones (lots of left padding) gives what it gives alone, and
    the pad id's value does not matter."""
    short = "write"
    alone = HFEngine(model64, tokenizer).generate([short], max_new_tokens=10, temperature=temperature, seed=3)
    for pad in (0, 7, 250):
        engine = HFEngine(model64, tokenizer, pad_token_id=pad)
        batched = engine.generate([PROMPTS[1], short, PROMPTS[5]], max_new_tokens=10, temperature=temperature, seed=3)
        assert batched[1][0].token_ids == alone[0][0].token_ids
        assert pad not in batched[1][0].token_ids or pad in alone[0][0].token_ids


def test_engine_pad_id_outside_the_vocabulary(tokenizer):
    """A pad id that is no token id (generation_config.pad_token_id = -1, as in early Llama conversions, or one
    >= the vocabulary) crashed with IndexError in the embedding, and only once a batch needed padding. The
    default now skips it (the pad is filler under the mask), and an explicit one is refused at construction."""
    model = build_model(len(tokenizer)).to(torch.float64)
    model.generation_config.pad_token_id = -1
    engine = HFEngine(model, tokenizer)
    assert engine.pad_token_id == tokenizer.pad_token_id
    got = engine.generate([PROMPTS[1], "write"], max_new_tokens=4)
    assert got[1] == engine.generate(["write"], max_new_tokens=4)[0]
    for pad in (-1, len(tokenizer)):
        with pytest.raises(AlignfastArgumentError, match=rf"'pad_token_id' must be a token id in \[0, 300\).*{pad}"):
            HFEngine(model, tokenizer, pad_token_id=pad)


def test_engine_n_samples_shapes(model64, tokenizer):
    engine = HFEngine(model64, tokenizer)
    greedy = engine.generate(PROMPTS[:3], max_new_tokens=5, n=4)
    assert [len(r) for r in greedy] == [4, 4, 4]
    for r in greedy:
        assert all(c.token_ids == r[0].token_ids for c in r)
        assert len({id(c) for c in r}) == 4  # separate objects, safe to mutate
    sampled = engine.generate(PROMPTS[:3], max_new_tokens=5, n=4, temperature=1.0, seed=0)
    assert [len(r) for r in sampled] == [4, 4, 4]
    for r in sampled:
        assert all(1 <= len(c.token_ids) <= 5 for c in r)
        assert len({tuple(c.token_ids) for c in r}) > 1


def test_engine_empty_prompt_list(model64, tokenizer):
    assert HFEngine(model64, tokenizer).generate([], max_new_tokens=4) == []


def test_engine_sampling_is_seeded_and_batching_independent(model64, tokenizer):
    kw = dict(max_new_tokens=8, temperature=0.9, top_p=0.9, n=3)
    a = HFEngine(model64, tokenizer).generate(PROMPTS, seed=11, **kw)
    assert a == HFEngine(model64, tokenizer).generate(PROMPTS, seed=11, **kw)
    assert a != HFEngine(model64, tokenizer).generate(PROMPTS, seed=12, **kw)
    # other batch cuts and prefill chunks, no de-duplication, the fallback cache, a different order
    # and subset: the same samples per (prompt, sample)
    for layout in LAYOUTS[1:]:
        mbt, pct, packed = layout
        b = HFEngine(model64, tokenizer, max_batch_tokens=mbt, prefill_chunk_tokens=pct, packed_cache=packed,
                     dedupe=mbt < 1000).generate(PROMPTS, seed=11, **kw)
        assert a == b, layout
    c = HFEngine(model64, tokenizer, max_batch_size=2).generate([PROMPTS[4], PROMPTS[0]], seed=11, **kw)
    assert c == [a[4], a[0]]
    # the second occurrence of a duplicated prompt draws its own samples
    assert a[0] != a[3]


def test_engine_seed_none_uses_torch_rng(model64, tokenizer):
    engine = HFEngine(model64, tokenizer)
    torch.manual_seed(5)
    a = engine.generate(PROMPTS[:2], max_new_tokens=6, temperature=1.0)
    torch.manual_seed(5)
    assert a == engine.generate(PROMPTS[:2], max_new_tokens=6, temperature=1.0)


def test_engine_greedy_leaves_the_torch_rng_alone(model64, tokenizer):
    """A greedy call with seed=None drew a base seed from torch's global generator it never used, so an
    evaluation generate between training steps shifted the training's random draws. Only sampling draws."""
    engine = HFEngine(model64, tokenizer)
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    engine.generate(PROMPTS, max_new_tokens=3, n=2)
    assert torch.equal(torch.rand(3), want)


def test_engine_empty_eos_list_switches_eos_off(tokenizer):
    """eos_token_id=[] fell back to generation_config's EOS (an `or` where `is not None` was meant), so EOS
    could not be switched off. The model here emits its EOS (2) early; with [] it runs to max_new_tokens."""
    model = build_model(len(tokenizer)).to(torch.float64)
    first = HFEngine(model, tokenizer).generate(PROMPTS[:1], max_new_tokens=1)[0][0].token_ids[0]
    model.generation_config.eos_token_id = first
    assert HFEngine(model, tokenizer).generate(PROMPTS[:1], max_new_tokens=5)[0][0].token_ids == [first]
    engine = HFEngine(model, tokenizer, eos_token_id=[])
    assert engine.eos_token_ids == []
    c = engine.generate(PROMPTS[:1], max_new_tokens=5)[0][0]
    assert len(c.token_ids) == 5 and c.finish_reason == "length"


def test_engine_token_id_prompts(model64, tokenizer):
    engine = HFEngine(model64, tokenizer)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    from_text = engine.generate([PROMPTS[0]], max_new_tokens=6)
    for form in (ids, tuple(ids), torch.tensor(ids)):
        assert engine.generate([form], max_new_tokens=6) == from_text


def test_engine_long_prompts_truncated_or_rejected(model64, tokenizer):
    long_ids = tokenizer(PROMPTS[1])["input_ids"]
    assert len(long_ids) > 12
    engine = HFEngine(model64, tokenizer, max_prompt_length=12)
    with pytest.warns(UserWarning, match="truncated"):
        got = engine.generate([long_ids, PROMPTS[2]], max_new_tokens=6)
    assert got[0] == engine.generate([long_ids[-12:]], max_new_tokens=6)[0]
    strict = HFEngine(model64, tokenizer, max_prompt_length=12, on_long_prompt="error")
    with pytest.raises(AlignfastArgumentError, match=r"prompts\[1\]"):
        strict.generate([PROMPTS[2], long_ids], max_new_tokens=6)
    # the default limit is max_position_embeddings - max_new_tokens
    model = build_model(len(tokenizer), max_positions=16).to(torch.float64)
    with pytest.warns(UserWarning, match="last 10 tokens"):
        HFEngine(model, tokenizer).generate([long_ids], max_new_tokens=6)


def test_engine_live_model_is_restored_and_untouched(tokenizer):
    """The trainer may sample from a model it is training: no copy, mode restored, no grads kept."""
    model = build_model(len(tokenizer)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptr = model.lm_head.weight.data_ptr()
    engine = HFEngine(model, tokenizer)
    engine.generate(PROMPTS[:2], max_new_tokens=4, temperature=1.0, seed=0)
    assert model.training and engine.model is model and model.lm_head.weight.data_ptr() == ptr
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_engine_bad_arguments(model64, tokenizer):
    engine = HFEngine(model64, tokenizer)
    cases = [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=4, temperature=float("nan")), "temperature"),
        (dict(max_new_tokens=4, top_p=0.0), "top_p"),
        (dict(max_new_tokens=4, top_p=1.5), "top_p"),
        (dict(max_new_tokens=4, n=0), "n"),
        (dict(max_new_tokens=4, seed=1.5), "seed"),
    ]
    for kwargs, name in cases:
        with pytest.raises(AlignfastArgumentError, match=f"'{name}'"):
            engine.generate(PROMPTS[:1], **kwargs)
    with pytest.raises(AlignfastArgumentError, match=r"prompts\[1\]"):
        engine.generate(["ok", [1, 5000]], max_new_tokens=2)
    with pytest.raises(AlignfastArgumentError, match=r"prompts\[0\]"):
        engine.generate([[]], max_new_tokens=2)
    with pytest.raises(AlignfastArgumentError, match=r"prompts\[0\]"):
        engine.generate([[1.5, 2]], max_new_tokens=2)
    with pytest.raises(AlignfastArgumentError, match="'prompts'"):
        engine.generate("just a string", max_new_tokens=2)
    with pytest.raises(AlignfastArgumentError, match="'prompts'"):
        HFEngine(model64).generate(["text needs a tokenizer"], max_new_tokens=2)
    with pytest.raises(AlignfastArgumentError, match="'on_long_prompt'"):
        HFEngine(model64, tokenizer, on_long_prompt="drop")
    with pytest.raises(AlignfastArgumentError, match="'max_batch_tokens'"):
        HFEngine(model64, tokenizer, max_batch_tokens=0)
    with pytest.raises(AlignfastArgumentError, match="'dtype'"):
        HFEngine(model64, tokenizer, dtype=torch.float16)


@pytest.mark.slow  # torch.compile takes minutes on a small CPU
def test_engine_compiled_decode_matches_eager(model64, tokenizer):
    eager = HFEngine(model64, tokenizer).generate(PROMPTS, max_new_tokens=8, temperature=1.0, n=2, seed=0)
    engine = HFEngine(model64, tokenizer, compile=True)
    assert engine.generate(PROMPTS, max_new_tokens=8, temperature=1.0, n=2, seed=0) == eager
    assert engine.generate(PROMPTS[:3], max_new_tokens=8) == HFEngine(model64, tokenizer).generate(PROMPTS[:3],
                                                                                                   max_new_tokens=8)


def test_engine_default_budget(model64, tokenizer, monkeypatch):
    from alignfast.rollout.hf_engine import DEFAULT_MAX_BATCH_TOKENS, default_batch_limits, kv_bytes_per_token

    # 2 (K and V) * 2 layers * 2 KV heads * head_dim 48/4 * 8 bytes (float64)
    assert kv_bytes_per_token(model64) == 2 * 2 * 2 * 12 * 8
    engine = HFEngine(model64, tokenizer)
    assert (engine.max_batch_tokens, engine.max_batch_size) == (DEFAULT_MAX_BATCH_TOKENS, None)  # on CPU
    assert HFEngine(model64, tokenizer, max_batch_tokens=500).max_batch_tokens == 500
    # on a GPU with 10 GB free: 40% for KV, a tenth for one step's sampling buffers (24 B per vocab entry)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**10, 8 * 10**10))
    tokens, rows = default_batch_limits(model64, torch.device("cuda"))
    assert tokens == int(0.4 * 10**10) // 768 and rows == 10**9 // (24 * len(tokenizer))


def _tiny(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "qwen2":  # biases on q/k/v, tied embeddings
        config = tf.Qwen2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
        cls = tf.Qwen2ForCausalLM
    else:  # gpt2: learned absolute positions, fused qkv
        config = tf.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=256, **common)
        cls = tf.GPT2LMHeadModel
    torch.manual_seed(2)
    model = cls(config).to(torch.float64).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(25.0)  # well-separated greedy choices
    return model


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_engine_other_model_families_match_generate(tokenizer, family):
    model = _tiny(family, len(tokenizer))
    engine = HFEngine(model, tokenizer, prefill_chunk_tokens=40)
    got = engine.generate(PROMPTS, max_new_tokens=8)
    for prompt, completions in zip(PROMPTS, got):
        assert completions[0].token_ids == reference_generate(model, tokenizer, prompt, 8)


def test_engine_bfloat16_runs_and_keeps_padding_out(model64, tokenizer):
    """bf16 (the GPU dtype): batched rounding differs from single-prompt runs, so no exact comparison
    with generate here; the outputs are well-formed and a prompt's samples do not depend on the pad id."""
    import copy

    model = copy.deepcopy(model64).to(torch.bfloat16)
    a = HFEngine(model, tokenizer, pad_token_id=0).generate(PROMPTS, max_new_tokens=6, temperature=1.0, n=2, seed=0)
    b = HFEngine(model, tokenizer, pad_token_id=77).generate(PROMPTS, max_new_tokens=6, temperature=1.0, n=2, seed=0)
    assert a == b
    assert all(1 <= len(c.token_ids) <= 6 and all(0 <= t < len(tokenizer) for t in c.token_ids) for r in a for c in r)


@pytest.mark.gpu
def test_engine_on_cuda_matches_generate_and_fits_defaults(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).to("cuda").eval()
    engine = HFEngine(model, tokenizer, prefill_chunk_tokens=40)
    assert engine.max_batch_tokens >= 32768 and engine.max_batch_size >= 64
    got = engine.generate(PROMPTS, max_new_tokens=10)
    for prompt, completions in zip(PROMPTS, got):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.cuda()
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              pad_token_id=0)[0, ids.shape[1]:].tolist()
        if 2 in want:
            want = want[:want.index(2) + 1]
        assert completions[0].token_ids == want
    sampled = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_p=0.9, n=4, seed=0)
    assert sampled == engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_p=0.9, n=4, seed=0)
    bf16 = HFEngine(str(tiny_dir), device="cuda")  # loaded: bf16 and sdpa/flash-attention by default
    assert bf16.model.dtype == torch.bfloat16
    assert all(len(r) == 2 for r in bf16.generate(PROMPTS, max_new_tokens=6, temperature=1.0, n=2, seed=0))
