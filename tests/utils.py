"""Comparison helpers: fast path vs the float64 reference, with reports that say where and how much."""

from __future__ import annotations

import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over finite reference entries (0/0 counts as 0)."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    finite = torch.isfinite(ref)
    diff = torch.linalg.vector_norm((out - ref)[finite])
    norm = torch.linalg.vector_norm(ref[finite])
    if norm == 0:
        return float(diff)
    return float(diff / norm)


def assert_close(out: torch.Tensor, ref: torch.Tensor, *, rtol: float, atol: float, name: str = "output",
                 rel: float | None = None) -> None:
    """Elementwise |out - ref| <= atol + rtol*|ref| (and infinities equal), plus, when `rel` is given,
    the norm-wise relative error. On failure the message shows the worst element and both errors."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    assert not torch.isnan(o).any() or torch.isnan(r).any(), f"{name}: NaN in output where the reference has none"
    inf_ref = torch.isinf(r)
    assert torch.equal(torch.isinf(o), inf_ref) and torch.equal(o[inf_ref], r[inf_ref]), \
        f"{name}: infinities differ from the reference"
    fin = ~inf_ref & ~torch.isnan(r)
    err = (o - r).abs().where(fin, torch.zeros_like(o))
    bound = atol + rtol * r.abs().where(fin, torch.zeros_like(r))
    bad = err > bound
    rel_err = relative_error(o, r)
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[(err - bound).where(bad, torch.zeros_like(err))[bad].argmax()])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance (rtol={rtol}, atol={atol}); "
            f"worst at {idx}: got {o[idx].item():.10g}, reference {r[idx].item():.10g}; "
            f"max-abs {err.max().item():.3g}, relative {rel_err:.3g}")
    if rel is not None:
        assert rel_err <= rel, f"{name}: relative error {rel_err:.3g} > {rel}"


def random_mask(B: int, T: int, *, generator: torch.Generator | None = None, kind: str = "mixed") -> torch.Tensor:
    """Masks with the shapes that break scans: left and right padding, holes, fully masked rows."""
    g = generator
    mask = torch.ones(B, T, dtype=torch.bool)
    if kind == "full":
        return mask
    for b in range(B):
        r = b % 5
        if r == 0:  # right padding
            n = int(torch.randint(1, T + 1, (1,), generator=g))
            mask[b, n:] = False
        elif r == 1:  # left padding
            n = int(torch.randint(0, T, (1,), generator=g))
            mask[b, :n] = False
        elif r == 2:  # both ends plus random holes
            mask[b] = torch.rand(T, generator=g) > 0.3
            mask[b, : T // 4] = False
            mask[b, T - T // 4:] = False
        elif r == 3 and B > 1:  # fully masked row
            mask[b] = False
    return mask
