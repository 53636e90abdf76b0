"""The fast path's lean LoRA forward (alignfast/trainer/lora_fast.py) is PEFT's forward bit for bit:
outputs, gradients, the disabled adapter, dropout in training mode, an input cast to the adapter's dtype,
and a whole fast-path training run; what it does not cover goes through PEFT's own forward."""

import copy
import io

import pytest
import torch

from alignfast.trainer.lora_fast import install_lean_lora, remove_lean_lora
from tests.trainer.tiny import echo_trainer, small_world

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lora(dtype=torch.float32, dropout=0.0, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(dtype)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout,
                           init_lora_weights=False)  # non-zero B: the adapter changes every projection
    return peft.get_peft_model(model, lora)


def logits_and_grads(model, ids, seed=0):
    torch.manual_seed(seed)  # the same dropout masks when dropout is on
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits.float() * torch.linspace(-1, 1, logits.size(-1))).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def assert_bitwise(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.equal(la, lb), (la - lb).abs().max()
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name


@pytest.mark.parametrize("dtype,dropout,train", [(torch.float32, 0.0, False), (torch.float32, 0.2, True),
                                                 (torch.bfloat16, 0.0, False)])
def test_lean_forward_is_pefts_bit_for_bit(dtype, dropout, train, monkeypatch):
    peft_model = tiny_lora(dtype, dropout)
    lean = copy.deepcopy(peft_model)
    n = install_lean_lora(lean)
    assert n == 2 * len(TARGETS)
    if dtype == torch.bfloat16:  # PEFT keeps the adapter in float32: the input is cast on the way in
        assert next(p for name, p in lean.named_parameters() if "lora_A" in name).dtype == torch.float32
    peft_model.train(train)
    lean.train(train)
    ids = torch.randint(0, 40, (3, 7))
    expected = logits_and_grads(peft_model, ids)
    with peft_model.disable_adapter(), torch.no_grad():
        expected_off = peft_model(input_ids=ids).logits

    def not_called(*args, **kwargs):
        raise AssertionError("PEFT's lora.Linear.forward ran: the lean forward handed over")

    monkeypatch.setattr(peft.tuners.lora.Linear, "forward", not_called)
    got = logits_and_grads(lean, ids)
    assert_bitwise(expected, got)
    if dropout:  # dropout really ran: a different seed gives other logits
        assert not torch.equal(logits_and_grads(lean, ids, seed=1)[0], got[0])
    with lean.disable_adapter(), torch.no_grad():
        off = lean(input_ids=ids).logits
    assert torch.equal(expected_off, off)
    assert not torch.equal(off, got[0])  # the adapter was off there
    monkeypatch.undo()
    # Nothing the adapter saves changed; a pickled model keeps the lean forward.
    assert peft_model.state_dict().keys() == lean.state_dict().keys()
    buffer = io.BytesIO()
    torch.save(lean, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    monkeypatch.setattr(peft.tuners.lora.Linear, "forward", not_called)
    assert torch.equal(logits_and_grads(loaded, ids)[0], got[0])
    monkeypatch.undo()
    assert remove_lean_lora(lean) == n and "forward" not in lean.base_model.model.model.layers[0].self_attn.q_proj.__dict__


def test_what_the_lean_forward_does_not_cover_goes_through_peft():
    peft_model = tiny_lora()
    lean = copy.deepcopy(peft_model)
    install_lean_lora(lean)
    ids = torch.randint(0, 40, (2, 5))
    layer = lean.base_model.model.model.layers[0].self_attn.q_proj
    # A hook on a submodule: PEFT's forward calls it, so the lean forward hands over.
    seen = []
    handle = layer.lora_A["default"].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert_bitwise(logits_and_grads(peft_model, ids), logits_and_grads(lean, ids))
    assert seen
    handle.remove()
    # A merged adapter: PEFT's forward (base layer only).
    peft_model.merge_adapter()
    lean.merge_adapter()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, lean(input_ids=ids).logits)
    lean.unmerge_adapter()
    peft_model.unmerge_adapter()
    # DoRA is a LoRA variant: not covered at all.
    from transformers import LlamaConfig, LlamaForCausalLM

    dora = peft.get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                                            num_hidden_layers=1, num_attention_heads=2)),
                               peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert install_lean_lora(dora) == 0


def test_fast_lora_training_is_unchanged_by_the_lean_forward(tmp_path):
    """Two fast-path LoRA runs, one with PEFT's forward: the same rollouts, losses and adapter, bit for bit."""
    tok, prompter_dir = small_world(tmp_path)
    runs = []
    for lean in (True, False):
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0,
                               init_lora_weights=False)
        trainer, rec = echo_trainer(tok, prompter_dir, peft_config=lora, output_dir=str(tmp_path / str(lean)),
                                    backend="fast", seed=3, per_device_train_batch_size=2, num_mini_batches=2,
                                    num_ppo_epochs=2, max_steps=2, response_length=5, learning_rate=3e-3,
                                    save_strategy="no", logging_steps=1, rewrite_template="rewrite {prompt}")
        assert trainer.lean_lora_layers == 3  # the fast backend installs it
        if not lean:
            assert remove_lean_lora(trainer.model) == 3
        trainer.train()
        runs.append((trainer, rec))
    (a, ra), (b, rb) = runs
    for step in range(2):
        assert torch.equal(ra.responses[step], rb.responses[step])
        assert ra.losses[step] == rb.losses[step]
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), name
