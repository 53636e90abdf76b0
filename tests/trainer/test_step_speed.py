"""The fast path's step-speed choices change how, not what, is computed.

adamw_kernel: the fast backend steps with torch's fused AdamW (one pass per element), the reference
backend with foreach; both are exact AdamW, so several steps of each on the same random parameters and
gradients agree to rounding (float64: 1e-12; float32: 1e-6 relative), weight decay and bounded param
groups included. End to end, tests/trainer/test_parity.py runs the two backends (hence the two
optimizers) side by side.
"""

import types

import torch

from alignfast.trainer.ppo_core import adamw_kernel, bounded_param_groups
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
    sharded = types.SimpleNamespace(sharded_state=True)  # FSDP2 / ZeRO-3 keep the path accelerate tests
    assert adamw_kernel("fast", ps, sharded) == {"foreach": True}
    assert adamw_kernel("fast", ps, types.SimpleNamespace(sharded_state=False)) == {"fused": True}


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
