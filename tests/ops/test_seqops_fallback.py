"""Without the extension (ALIGNFAST_DISABLE_EXT=1, what a pure-Python install sees) compute_advantages and
ppo_loss fall back to the reference with one warning, and give what the C++ kernels give."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

import alignfast.ops as ops
from tests.ops.test_advantages import make_inputs as advantage_inputs
from tests.ops.test_ppo_loss import leaf
from tests.ops.test_ppo_loss import make_inputs as ppo_inputs
from tests.utils import assert_close

SCRIPT = textwrap.dedent("""
    import sys, warnings
    import torch
    from tests.ops.test_advantages import make_inputs as advantage_inputs
    from tests.ops.test_ppo_loss import make_inputs as ppo_inputs, leaf
    import alignfast.ops as ops
    from alignfast import _ext
    assert not _ext.available()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adv = ops.compute_advantages(*advantage_inputs(9, 31, seed=1), kl_coef=0.05, kl_estimator="k3", lam=0.9)
        tensors, mask = ppo_inputs(9, 31, seed=2)
        tensors = leaf(tensors)
        loss, stats = ops.ppo_loss(*tensors, mask)
        loss.backward()
        ops.ppo_loss(*tensors, mask)
    fallback_warnings = [w for w in caught if "alignfast" in str(w.message)]
    torch.save(dict(adv=adv, loss=loss.detach(), stats=stats, grads=(tensors[0].grad, tensors[3].grad),
                    warnings=[str(w.message) for w in fallback_warnings]), sys.argv[1])
""")


def test_without_extension_ops_fall_back_to_the_reference(tmp_path):
    out_file = tmp_path / "fallback.pt"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "ALIGNFAST_DISABLE_EXT": "1", "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out_file)], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = torch.load(out_file)
    assert len(got["warnings"]) == 1 and "disabled by ALIGNFAST_DISABLE_EXT=1" in got["warnings"][0]

    adv = ops.compute_advantages(*advantage_inputs(9, 31, seed=1), kl_coef=0.05, kl_estimator="k3", lam=0.9)
    for name, a, b in zip(("rewards", "advantages", "returns", "kl"), adv, got["adv"]):
        assert a.dtype == b.dtype
        assert_close(b, a, name=name, rtol=1e-5, atol=1e-5)

    tensors, mask = ppo_inputs(9, 31, seed=2)
    tensors = leaf(tensors)
    loss, stats = ops.ppo_loss(*tensors, mask)
    loss.backward()
    assert_close(got["loss"], loss, name="loss", rtol=1e-5, atol=1e-6)
    for name in stats:
        assert_close(got["stats"][name], stats[name], name=name, rtol=1e-5, atol=1e-6)
    assert_close(got["grads"][0], tensors[0].grad, name="d/dlogprobs", rtol=1e-5, atol=1e-7)
    assert_close(got["grads"][1], tensors[3].grad, name="d/dvalues", rtol=1e-5, atol=1e-7)



def test_triton_ops_on_cuda_without_triton_use_the_reference(monkeypatch):
    """What `alignfast.info` reports (reference, "triton is not installed") is what the wrappers do: the lazily
    registered CUDA kernel of a Triton op would raise ImportError from inside the dispatcher instead."""
    import warnings
    from types import SimpleNamespace

    from alignfast.ops import _library

    cuda_tensor = SimpleNamespace(device=SimpleNamespace(type="cuda"))  # only its device type is read
    monkeypatch.setitem(_library._found, "triton", False)
    monkeypatch.setattr(_library, "_warned", set())
    triton_ops = [name for name, info in _library.OPS.items() if info.gpu_impl == "triton" and info.public]
    assert triton_ops
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in triton_ops:
            assert _library.describe(name, "cuda")[0] == "reference"
            assert _library.use_reference(name, cuda_tensor)
    assert [str(w.message) for w in caught if "triton is not installed" in str(w.message)] != []
    assert len(caught) == 1  # once per process, not per call
    monkeypatch.setitem(_library._found, "triton", True)
    assert not _library.use_reference("token_logprobs", cuda_tensor)  # the Triton kernel is registered for CUDA
