"""Memory options that must not change results: activation checkpointing (gradient_checkpointing) gives
the same losses and parameters as a run without it, while autograd keeps fewer bytes for the backward;
the fast path keeps no [N, V] logits for the backward (the reference path does)."""

import pytest
import torch

from alignfast.trainer.ppo_core import UpdateStats, compute_advantages
from tests.trainer.tiny import echo_trainer, small_world
from tests.utils import relative_error


def run(tok, prompter_dir, tmp_path, name, peft_config=None, **overrides):
    cfg = dict(output_dir=str(tmp_path / name), seed=5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
               num_mini_batches=1, num_ppo_epochs=2, max_steps=2, response_length=5, temperature=0.9,
               learning_rate=3e-3, save_strategy="no", rewrite_template="rewrite {prompt}")
    cfg.update(overrides)
    trainer, rec = echo_trainer(tok, prompter_dir, peft_config=peft_config, **cfg)
    trainer.train()
    return trainer, rec


def saved_for_backward(trainer) -> tuple[int, list]:
    """(bytes, shapes) of what autograd saves for one micro-batch of the last rollout, parameters excluded."""
    cfg = trainer.config
    rollout = trainer.last_rollout
    adv = compute_advantages(rollout, trainer.ops, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, gamma=cfg.gamma,
                             lam=cfg.lam, whiten_rewards=False, whiten_advantages=True)
    params = {p.untyped_storage().data_ptr() for p in trainer.params}
    saved, shapes = {}, []

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.updater._micro_step(rollout, adv, torch.arange(2), UpdateStats())
    loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return sum(saved.values()), shapes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("memory"), layers=3)


@pytest.mark.parametrize("value_head,lora", [("separate", False), ("shared", False), ("separate", True)])
def test_gradient_checkpointing_changes_memory_not_results(world, tmp_path, value_head, lora):
    tok, prompter_dir = world
    extra = {}
    if lora:
        peft = pytest.importorskip("peft")
        extra["peft_config"] = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               lora_dropout=0.0, init_lora_weights=False)
    plain, rp = run(tok, prompter_dir, tmp_path, "plain", value_head=value_head, **extra)
    ckpt, rc = run(tok, prompter_dir, tmp_path, "ckpt", value_head=value_head, gradient_checkpointing=True, **extra)
    assert len(ckpt.policy.checkpointed) >= 3  # the decoder layers (and the stack) are checkpointed
    if value_head == "separate":
        assert len(ckpt.value_model.checkpointed) >= 3
    for step in range(2):
        assert torch.equal(rp.responses[step], rc.responses[step])
        err = relative_error(torch.tensor(rc.losses[step], dtype=torch.float64),
                             torch.tensor(rp.losses[step], dtype=torch.float64))
        assert err <= 1e-6, f"step {step + 1}: {rc.losses[step]} vs {rp.losses[step]}"
    for (name, a), (_, b) in zip(plain.model.named_parameters(), ckpt.model.named_parameters()):
        assert relative_error(b, a) <= 1e-6, name
    # Dropout stays off: the trainer's modules are all in eval mode between steps.
    assert not any(m.training for m in ckpt.model.modules())
    kept_plain, _ = saved_for_backward(plain)
    kept_ckpt, _ = saved_for_backward(ckpt)
    assert kept_ckpt < 0.7 * kept_plain, (kept_ckpt, kept_plain)


def test_fast_path_keeps_no_vocabulary_sized_tensor_for_backward(world, tmp_path):
    tok, prompter_dir = world
    fast, _ = run(tok, prompter_dir, tmp_path, "fast", max_steps=1)
    ref, _ = run(tok, prompter_dir, tmp_path, "ref", max_steps=1, backend="reference")
    V = fast.model.config.vocab_size
    T = fast.last_rollout.query_ids.size(1) + fast.last_rollout.response_ids.size(1)

    def vocab_rows(shapes):  # rows of the largest saved tensor with a vocabulary-sized last dimension
        return max([torch.Size(s[:-1]).numel() for s in shapes if s and s[-1] == V], default=0)

    _, fast_shapes = saved_for_backward(fast)
    _, ref_shapes = saved_for_backward(ref)
    assert vocab_rows(ref_shapes) >= 2 * 2  # the reference keeps [B, T, V] logits (T rows a sequence)
    assert vocab_rows(fast_shapes) == 0, [s for s in fast_shapes if s and s[-1] == V]
    assert T > 2


def test_bounded_param_groups_change_no_update():
    """The optimizer's params in groups of bounded size (smaller foreach temporaries): every parameter once,
    in order, and AdamW's update bitwise that of one group."""
    from alignfast.trainer.ppo_core import bounded_param_groups

    torch.manual_seed(0)
    shapes = [(40, 30), (7,), (100, 50), (3, 3), (60, 20), (1,)]
    base = [torch.randn(s) for s in shapes]
    groups = bounded_param_groups([torch.nn.Parameter(b.clone()) for b in base], max_numel=1500)
    assert [tuple(p.shape) for g in groups for p in g["params"]] == shapes
    assert all(sum(p.numel() for p in g["params"]) <= 1500 or len(g["params"]) == 1 for g in groups)
    assert [len(g["params"]) for g in groups] == [2, 1, 3]  # (40x30, 7), (100x50 alone), (3x3, 60x20, 1)
    one = [torch.nn.Parameter(b.clone()) for b in base]
    split = [torch.nn.Parameter(b.clone()) for b in base]
    kw = dict(lr=1e-2, weight_decay=0.1, foreach=True)
    opt_one = torch.optim.AdamW(one, **kw)
    opt_split = torch.optim.AdamW(bounded_param_groups(split, max_numel=1500), **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for a, b in zip(one, split):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt_one.step()
        opt_split.step()
    assert all(torch.equal(a, b) for a, b in zip(one, split))
