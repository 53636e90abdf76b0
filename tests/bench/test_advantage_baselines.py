"""The benchmark's TRL- and verl-style GAE loops compute what alignfast.reference computes (where their
mask conventions agree), so the speed-ups in bench/RESULTS.md compare like with like."""

import torch

from alignfast import reference
from bench import baselines
from tests.ops.test_advantages import make_inputs
from tests.utils import assert_close, random_mask


def right_padded_mask(B, T, g):
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    return torch.arange(T).expand(B, T) < lengths[:, None]


def _compare(got, want, mask, whiten_rtol=1e-10):
    for name, a, b in zip(("rewards", "advantages", "returns", "kl"), got, want):
        rtol = whiten_rtol if name == "advantages" else 1e-10
        assert_close(a[mask], b[mask], name=name, rtol=rtol, atol=1e-10)


def test_trl_loop_matches_reference_on_right_padding():
    g = torch.Generator().manual_seed(0)
    mask = right_padded_mask(12, 40, g)
    inputs = make_inputs(12, 40, dtype=torch.float64, mask=mask)
    kw = dict(kl_coef=0.07, gamma=0.97, lam=0.9)
    # TRL's Bessel factor is int64 / int64, a float32 division: whitened values agree to ~1e-8 only.
    _compare(baselines.trl_advantages(*inputs, **kw), reference.compute_advantages(*inputs, **kw), mask,
             whiten_rtol=1e-6)


def test_verl_loop_matches_reference_on_any_mask():
    mask = random_mask(10, 33, generator=torch.Generator().manual_seed(1))
    inputs = make_inputs(10, 33, dtype=torch.float64, mask=mask)
    kw = dict(kl_coef=0.07, gamma=1.0, lam=0.95)
    _compare(baselines.verl_advantages(*inputs, **kw), reference.compute_advantages(*inputs, **kw), mask)
