"""The fast path's step-speed choices change how, not what, is computed.

adamw_kernel: the fast backend steps with torch's fused AdamW (one pass per element), the reference
backend with foreach; both are exact AdamW, so several steps of each on the same random parameters and
gradients agree to rounding (float64: 1e-12; float32: 1e-6 relative), weight decay and bounded param
groups included. End to end, tests/trainer/test_parity.py runs the two backends (hence the two
optimizers) side by side.
"""

import pytest

import torch

from alignfast.trainer.optimizers import adamw_kernel
from alignfast.trainer.ppo_core import bounded_param_groups
from tests.utils import relative_error


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 5), (5,), (300,), (4, 4, 3)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _run(params, steps, **kernel):
    opt = torch.optim.AdamW(bounded_param_groups(params, max_numel=200), lr=3e-2, betas=(0.9, 0.95), eps=1e-6,
                            weight_decay=0.1, **kernel)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    return params


def test_kernel_choice():
    ps = _params(torch.float32)
    assert adamw_kernel("fast", ps) == {"fused": True}
    assert adamw_kernel("reference", ps) == {"foreach": True}
    assert adamw_kernel("fast", ps + [torch.nn.Parameter(torch.ones(2, device="meta"))]) == {"foreach": True}


def test_fused_and_foreach_adamw_agree():
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        fused = _run(_params(dtype), 5, **adamw_kernel("fast", _params(dtype)))
        foreach = _run(_params(dtype), 5, **adamw_kernel("reference", _params(dtype)))
        start = _params(dtype)
        for a, b, s in zip(fused, foreach, start):
            assert not torch.equal(a, s)  # the steps moved the parameters
            assert relative_error(a.detach(), b.detach()) <= tol, (dtype, relative_error(a.detach(), b.detach()))


def test_trainer_uses_the_backends_kernel(tmp_path):
    from tests.trainer.tiny import echo_trainer, small_world

    tok, prompter_dir = small_world(tmp_path)
    for backend, key in (("fast", "fused"), ("reference", "foreach")):
        trainer, _ = echo_trainer(tok, prompter_dir, output_dir=str(tmp_path / backend), backend=backend, max_steps=1,
                                  save_strategy="no", response_length=3)
        assert all(group[key] for group in trainer.optimizer.param_groups), backend


# --- torch_compile: regional compilation of the decoder layers ----------------------------------------------


def _parity_cfg(tmp_path, name, **overrides):
    return dict(output_dir=str(tmp_path / name), backend="fast", seed=3, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, num_mini_batches=2, num_ppo_epochs=2, max_steps=2, response_length=5,
                temperature=0.9, kl_coef=0.1, learning_rate=3e-3, save_strategy="no", logging_steps=1,
                rewrite_template="rewrite {prompt}", **overrides)


def _compiled_vs_eager(tmp_path, value_head="separate", peft_config=None, **overrides):
    """Two fast runs, torch_compile on and off: same rollouts, losses and parameters to float32 rounding; the
    compiled calls are on only inside the full-sequence forwards (never in the sampler)."""
    from tests.trainer.tiny import echo_trainer, small_world

    tok, prompter_dir = small_world(tmp_path)
    runs = {}
    for flag in (True, False):
        trainer, rec = echo_trainer(tok, prompter_dir, peft_config=peft_config,
                                    **_parity_cfg(tmp_path, f"c{flag}", torch_compile=flag, value_head=value_head,
                                                  **overrides))
        trainer.train()
        runs[flag] = (trainer, rec)
    (tc, rc), (te, re_) = runs[True], runs[False]
    assert tc.policy.compiled is not None and len(tc.policy.compiled) > 0 and te.policy.compiled is None
    assert all(layer._compiled_call_impl is None for layer, _ in tc.policy.compiled._compiled)  # off outside
    for step in range(2):
        assert torch.equal(rc.responses[step], re_.responses[step])
        err = relative_error(torch.tensor(rc.losses[step], dtype=torch.float64),
                             torch.tensor(re_.losses[step], dtype=torch.float64))
        assert err <= 1e-4, (step, err)
    for (name, pc), (_, pe) in zip(tc.model.named_parameters(), te.model.named_parameters()):
        assert relative_error(pc.detach(), pe.detach()) <= 1e-4, name
    return tc


@pytest.mark.parametrize("checkpointing", [False, True])
def test_torch_compile_keeps_parity_traced(tmp_path, monkeypatch, checkpointing):
    """Default run: dynamo's graphs without inductor's code generation (seconds, not minutes); with
    gradient_checkpointing too (the checkpointed layer body is traced inside the compiled call)."""
    import torch._dynamo

    from alignfast.trainer import compiled_layers

    monkeypatch.setattr(compiled_layers, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    trainer = _compiled_vs_eager(tmp_path, gradient_checkpointing=checkpointing)
    # One layer class: a handful of graphs (grad on/off, trainable/frozen weights, with/without padding mask),
    # not one per layer or per sequence length.
    assert 1 <= counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
    # The policy, the reference policy and the critic each got their layers compiled.
    layers = {id(layer) for layer, _ in trainer.policy.compiled._compiled}
    for backbone in (trainer.policy.backbone, trainer._ref_policy.backbone, trainer.value_model.backbone):
        assert all(id(layer) in layers for layer in compiled_layers.decoder_layers(backbone))
    assert len(layers) == 3  # one layer each (tests/trainer/tiny.py's small world)


@pytest.mark.slow
@pytest.mark.parametrize("value_head", ["separate", "shared"])
def test_torch_compile_keeps_parity_inductor(tmp_path, value_head):
    """inductor's CPU kernels (a C++ compiler runs: a minute or more on 2 cores).
    python -m pytest tests/trainer/test_step_speed.py -m slow -q"""
    import torch._dynamo

    torch._dynamo.reset()
    _compiled_vs_eager(tmp_path, value_head=value_head)


def test_torch_compile_validates(tmp_path):
    from alignfast.ops._checks import AlignfastArgumentError
    from alignfast.trainer import AlignProConfig
    from alignfast.trainer.compiled_layers import decoder_layers

    with pytest.raises(AlignfastArgumentError, match="torch_compile.*true or false"):
        AlignProConfig(output_dir=str(tmp_path), torch_compile="yes")
    with pytest.raises(AlignfastArgumentError, match="torch_compile.*backend 'fast' only"):
        AlignProConfig(output_dir=str(tmp_path), torch_compile=True, backend="reference")
    with pytest.raises(AlignfastArgumentError, match="torch_compile.*decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_torch_compile_keeps_parity_with_lora_traced(tmp_path, monkeypatch):
    """LoRA: the reference policy is the policy with its adapter disabled, so the same layers serve both (one
    compiled call each) and the adapter switch is a guard, not a wrong graph."""
    import torch._dynamo
    from peft import LoraConfig

    from alignfast.trainer import compiled_layers

    monkeypatch.setattr(compiled_layers, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _compiled_vs_eager(tmp_path, value_head="shared", peft_config=lora)
    assert trainer.ref_model is None and len(trainer.policy.compiled) == 1  # one layer, policy = reference
