"""Memory settings (issue 14 item 1): torchao's 8/4-bit AdamW (`optim`), one frozen copy for the reference and
an identical target (`share_frozen_weights`), a bfloat16 reference (`frozen_dtype`).

The 8-bit optimizer compiles one kernel per parameter shape on its first step (tens of seconds on a cold
cache); the model here has few distinct shapes (hidden = intermediate = 64) so that CI pays it once."""

import sys

import pytest
import torch

from alignfast.ops._checks import AlignfastArgumentError
from tests.trainer.tiny import FunctionTarget, Recorder, TRAIN_PROMPTS, WORDS, keyword_reward, make_tokenizer

BASE = dict(seed=3, per_device_train_batch_size=3, num_mini_batches=2, num_ppo_epochs=2, max_steps=2,
            response_length=4, temperature=1.0, learning_rate=5e-3, logging_steps=1, save_strategy="no",
            rewrite_template="{prompt}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lowmem")
    tok = make_tokenizer(root / "tok", WORDS)
    torch.manual_seed(0)
    # 64 x 64 matrices: >= 4096 elements, so torchao quantises their state (smaller tensors keep float32 state).
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(root / "prompter"))
    tok.save_pretrained(str(root / "prompter"))
    return tok, root / "prompter"


def trainer_for(world, out, *, target="echo", peft_config=None, callbacks=(), **overrides):
    """An AlignProTrainer on the tiny world; target "echo" (a function) or "same" (an HFEngine over a second
    load of the prompter's weights, as a run with one model for both roles has)."""
    from transformers import AutoModelForCausalLM

    from alignfast.rollout import HFEngine
    from alignfast.trainer import AlignProConfig, AlignProTrainer

    tok, path = world
    engine = FunctionTarget(lambda s: s, tok) if target == "echo" else \
        HFEngine(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if target == "same-bf16" else None)
                 .eval().requires_grad_(False), tok)
    cfg = AlignProConfig(**{**BASE, "output_dir": str(out), "target_max_new_tokens": 3, **overrides})
    return AlignProTrainer(cfg, AutoModelForCausalLM.from_pretrained(path), tok, engine,
                           reward_funcs=[keyword_reward], train_dataset=TRAIN_PROMPTS, peft_config=peft_config,
                           callbacks=list(callbacks))


def params(trainer) -> dict:
    out = {f"policy.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    if trainer.value_model is not None:
        out.update({f"value.{n}": p.detach().clone() for n, p in trainer.value_model.named_parameters()})
    return out


KEYS = ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "lr")


def history(out) -> list[dict]:
    return [{k: m[k] for k in KEYS} for m in out.history]


# --- validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("optim", "adamw_bnb_8bit"), ("frozen_dtype", "bf16"),
                                         ("share_frozen_weights", "yes"), ("malloc_mmap_threshold", 0)])
def test_bad_memory_settings_name_the_setting(field, value):
    from alignfast.trainer import AlignProConfig

    with pytest.raises(AlignfastArgumentError, match=field):
        AlignProConfig(**{field: value})


def test_missing_torchao_is_an_error_naming_optim(monkeypatch):
    from alignfast.trainer import AlignProConfig
    from alignfast.trainer.optimizers import make_optimizer

    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    with pytest.raises(AlignfastArgumentError, match="optim.*torchao"):
        make_optimizer([torch.nn.Parameter(torch.zeros(3))], AlignProConfig(optim="adamw_torch_8bit"))


def test_frozen_dtype_with_lora_is_an_error(world, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(AlignfastArgumentError, match="frozen_dtype"):
        trainer_for(world, tmp_path / "x", peft_config=lora, frozen_dtype="bfloat16")


# --- low-bit optimizer state -------------------------------------------------------------------------
@pytest.mark.parametrize("optim", ["adamw_torch_8bit", pytest.param("adamw_torch_4bit", marks=pytest.mark.slow)])
def test_lowbit_optimizer_trains_and_resumes_bit_identically(world, tmp_path, optim):
    """The quantised state is used (not a float32 fallback), the weights move, and a run stopped after step 1
    and resumed from its checkpoint (weights_only load of torchao's tensor subclasses) ends bit-identical
    to the uninterrupted run."""
    pytest.importorskip("torchao")
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit

    cfg = dict(optim=optim, value_head="shared", save_strategy="steps", save_steps=1)
    full = trainer_for(world, tmp_path / "full", **cfg)
    before = params(full)
    full_out = full.train()
    after = params(full)
    kind = OptimState8bit if optim.endswith("8bit") else OptimState4bit
    states = [v for st in full.optimizer.state.values() for v in st.values()]
    assert any(isinstance(v, kind) for v in states), "no parameter got quantised optimizer state"
    assert any(not torch.equal(before[k], after[k]) for k in before), "the optimizer changed no weight"

    rec = Recorder(stop_at=1)
    first = trainer_for(world, tmp_path / "split", callbacks=[rec], **cfg)
    rec.trainer = first
    first.train()
    assert first.global_step == 1
    second = trainer_for(world, tmp_path / "split", **cfg)
    second_out = second.train(resume_from_checkpoint=True)
    resumed = params(second)
    for k in after:
        assert torch.equal(after[k], resumed[k]), f"{k} differs after resume"
    assert history(full_out) == history(second_out)


def test_resume_with_another_optim_is_an_error(world, tmp_path):
    pytest.importorskip("torchao")
    trainer_for(world, tmp_path / "run", max_steps=1, save_strategy="steps", save_steps=1,
                value_head="shared").train()
    other = trainer_for(world, tmp_path / "run", max_steps=2, value_head="shared", optim="adamw_torch_4bit")
    with pytest.raises(AlignfastArgumentError, match="optim.*adamw_torch"):
        other.train(resume_from_checkpoint=True)


# --- one frozen copy ---------------------------------------------------------------------------------
def test_reference_is_the_identical_target_and_results_are_unchanged(world, tmp_path):
    shared = trainer_for(world, tmp_path / "shared", target="same")
    engine_model = shared.environment.target.model
    assert shared.ref_model is engine_model
    ref_ptrs = {p.untyped_storage().data_ptr() for p in shared.ref_model.parameters()}
    assert ref_ptrs == {p.untyped_storage().data_ptr() for p in engine_model.parameters()}
    assert not ref_ptrs & {p.untyped_storage().data_ptr() for p in shared.model.parameters()}
    unshared = trainer_for(world, tmp_path / "unshared", target="same", share_frozen_weights=False)
    assert unshared.ref_model is not unshared.environment.target.model
    a, b = shared.train(), unshared.train()
    assert history(a) == history(b)
    pa, pb = params(shared), params(unshared)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # The shared reference was never trained: still the target's (and the initial prompter's) weights.
    first = trainer_for(world, tmp_path / "fresh", share_frozen_weights=False)
    for (n, p), (_, q) in zip(first.ref_model.named_parameters(), shared.ref_model.named_parameters()):
        assert torch.equal(p, q), n


def test_a_different_target_is_not_shared(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from alignfast.trainer.frozen import same_function

    tok, path = world
    policy = AutoModelForCausalLM.from_pretrained(path)
    other = AutoModelForCausalLM.from_pretrained(path).requires_grad_(False)
    assert same_function(policy, other, torch.float32)
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-6
    assert not same_function(policy, other, torch.float32)  # one value differs
    assert not same_function(policy, policy, torch.float32)  # the policy itself (Oracle: it is trained)
    assert not same_function(policy, AutoModelForCausalLM.from_pretrained(path), torch.float32)  # not frozen
    half = AutoModelForCausalLM.from_pretrained(path).requires_grad_(False).to(torch.bfloat16)
    assert not same_function(policy, half, torch.float32)
    assert not same_function(policy, half, torch.bfloat16)  # .to() also cast the rotary buffer: another function
    loaded_half = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).requires_grad_(False)
    assert same_function(policy, loaded_half, torch.bfloat16)  # as a run file's target.dtype: bfloat16 loads it


def test_lora_policy_base_shares_the_target_tensors(world, tmp_path):
    peft = pytest.importorskip("peft")

    def lora():
        return peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")

    shared = trainer_for(world, tmp_path / "shared", target="same", peft_config=lora())
    assert shared.ref_model is None and shared.shared_frozen
    target = dict(shared.environment.target.model.named_parameters())
    base = shared.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert base.untyped_storage().data_ptr() == target["model.layers.0.self_attn.q_proj.weight"].untyped_storage().data_ptr()
    emb = shared.model.base_model.model.model.embed_tokens.weight
    assert emb.untyped_storage().data_ptr() == target["model.embed_tokens.weight"].untyped_storage().data_ptr()
    assert shared.model.base_model.model.lm_head.weight is emb  # still tied
    unshared = trainer_for(world, tmp_path / "unshared", target="same", peft_config=lora(),
                           share_frozen_weights=False)
    assert history(shared.train()) == history(unshared.train())
    pa, pb = params(shared), params(unshared)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


# --- bfloat16 reference --------------------------------------------------------------------------------
def test_bfloat16_reference_runs_and_is_close(world, tmp_path):
    full = trainer_for(world, tmp_path / "f32", max_steps=1)
    half = trainer_for(world, tmp_path / "bf16", max_steps=1, frozen_dtype="bfloat16")
    assert {p.dtype for p in half.ref_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}
    full.train()
    half.train()
    r = full.last_rollout  # same seeds, same initial policy: the same rollout
    assert torch.equal(r.response_ids, half.last_rollout.response_ids)
    args = (r.query_ids, r.query_mask, r.response_ids, r.response_mask)
    with torch.no_grad():
        lp32, lp16 = full._ref_logprobs(*args), half._ref_logprobs(*args)
    assert lp16.dtype == torch.float32
    mask = r.response_mask.bool()
    err = (lp32 - lp16)[mask].abs().max().item()
    assert err < 0.05, f"bf16 reference log-probs off by {err}"
    assert err > 0  # it did run in bf16
    # The same model as a bfloat16 target (target.dtype: bfloat16): one bf16 copy serves both roles.
    both = trainer_for(world, tmp_path / "both", max_steps=1, frozen_dtype="bfloat16", target="same-bf16")
    assert both.ref_model is both.environment.target.model
    both.train()
    assert torch.equal(both.last_rollout.ref_logprobs, half.last_rollout.ref_logprobs)


# --- glibc's heap ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_mmap_threshold_is_applied(world, tmp_path, monkeypatch):
    from alignfast.trainer import allocator

    calls = []
    real = allocator.set_mmap_threshold
    monkeypatch.setattr(allocator, "set_mmap_threshold", lambda n: calls.append(n) or real(n))
    # 32 MiB: glibc's own ceiling for its dynamic threshold, so the rest of the test session runs as usual.
    trainer_for(world, tmp_path / "m", max_steps=1, malloc_mmap_threshold=32 * 1024 * 1024).train()
    assert calls == [32 * 1024 * 1024]
    assert real(32 * 1024 * 1024) is True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_full_fine_tuning_when_gradient_clipping_engages(world, tmp_path, dtype):
    """A bf16/fp16 prompter trained in full (prompter.dtype: bfloat16): the clip coefficient comes from half
    gradients, and torch's fused AdamW refused it as its grad_scale ("expected scalar type Float but found
    BFloat16") the first time clipping engaged. max_grad_norm 1e-6 makes every step clip."""
    from transformers import AutoModelForCausalLM

    from alignfast.trainer import AlignProConfig, AlignProTrainer

    tok, path = world
    cfg = AlignProConfig(**{**BASE, "output_dir": str(tmp_path), "target_max_new_tokens": 3, "max_grad_norm": 1e-6,
                            "max_steps": 1})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = AlignProTrainer(cfg, model, tok, FunctionTarget(lambda s: s, tok), reward_funcs=[keyword_reward],
                              train_dataset=TRAIN_PROMPTS)
    out = trainer.train()
    assert out.global_step == 1
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved and all(torch.isfinite(p).all() for p in trainer.model.parameters())
