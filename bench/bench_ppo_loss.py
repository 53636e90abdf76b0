"""ppo_loss forward + backward: the fused op (per-token gradients written in the forward pass, backward a
scale) vs alignfast.reference.ppo_loss under eager autograd vs torch.compile of the reference.

    python -m bench.bench_ppo_loss [--device cpu|cuda] [--record] [--quick]

Timing: bench/harness.py's interleaved rounds (--rounds, default 5), fresh inputs each round.
Each call computes the loss and its gradients with respect to logprobs and values (a training step's
share of the loss). float32 inputs, right-padded masks, cliprange 0.2, cliprange_value 0.2, vf_coef 0.1.
On CUDA, "x floor" = time / the time to read the six inputs and the mask once and write the two
gradients once (33 bytes per token) at the copy bandwidth measured in the same run; the fused path
moves 49 (its backward reads and rescales the saved gradients).
"""

from __future__ import annotations

import sys

import torch

import alignfast.ops as ops
from alignfast import reference
from bench import harness
from bench.bench_advantages import QUICK_SHAPES, SHAPES, cuda_graph_callable, parse_args, report

BASELINE = "reference (eager)"
KW = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)


# The gradients with respect to logprobs and values (float32, different reduction orders).
CHECK = harness.Check({torch.float32: (1e-4, 1e-6)})


def make_inputs(B: int, T: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=g) * 4
    old_logprobs = logprobs + 0.2 * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    old_values = values + 0.2 * torch.randn(B, T, generator=g)
    returns = values + torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T).expand(B, T) < lengths[:, None]
    tensors = [t.to(device) for t in (logprobs, old_logprobs, advantages, values, old_values, returns)]
    tensors[0].requires_grad_(True)
    tensors[3].requires_grad_(True)
    return tensors, mask.to(device)


def bytes_that_must_move(B: int, T: int) -> int:
    return B * T * (6 * 4 + 1 + 2 * 4)


def step_fn(loss_fn, tensors, mask):
    """One forward + backward; returns the gradients (so the memory measurement sees them)."""
    logprobs, values = tensors[0], tensors[3]

    def step():
        loss, _ = loss_fn(*tensors, mask, **KW)
        return torch.autograd.grad(loss, [logprobs, values])

    return step


def providers(device: str) -> dict:
    """name -> factory((tensors, mask)) -> the timed call (inputs drawn afresh each round)."""
    compiled = torch.compile(reference.ppo_loss, dynamic=False)  # compiled in the first round's warm-up
    table = {
        "alignfast (fused)": lambda inp: step_fn(ops.ppo_loss, *inp),
        BASELINE: lambda inp: step_fn(reference.ppo_loss, *inp),
        "torch.compile(reference)": lambda inp: step_fn(compiled, *inp),
    }
    if device == "cuda":
        table["alignfast (CUDA graph)"] = lambda inp: cuda_graph_callable(step_fn(ops.ppo_loss, *inp))
    return table


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    if args is None:
        return 2
    copy_bandwidth = harness.measured_copy_bandwidth(args.device) if args.device == "cuda" else None
    rows = []
    for B, T in QUICK_SHAPES if args.quick else SHAPES:
        rows += harness.run_rounds(f"{B}x{T}", providers(args.device),
                                   inputs=lambda r, B=B, T=T: make_inputs(B, T, args.device, seed=r),
                                   device=args.device, rounds=args.rounds, reps=1 if args.quick else 3, warmup=2,
                                   baselines=(BASELINE,), check=CHECK)
    if copy_bandwidth:
        for r in rows:
            if r.seconds:
                B, T = map(int, r.shape.split("x"))
                r.extra["x floor"] = f"{r.seconds / (bytes_that_must_move(B, T) / copy_bandwidth):.2f}"
    table = harness.format_table(rows, baseline=BASELINE, extra_columns=("x floor",) if copy_bandwidth else ())
    title = f"ppo_loss forward + backward ({args.device})"
    notes = ("float32, right-padded masks, gradients with respect to logprobs and values; speed-ups: per-round time "
             "of the eager reference over the provider's, median (IQR) over rounds. " + harness.spread_note(rows)).strip()
    if args.device == "cuda":
        notes += (" CUDA graph rows: peak extra memory is the graph's pool, taken when it is captured (a replay "
                  "allocates nothing).")
    if copy_bandwidth:
        notes += f" x floor: 33 bytes per token once at the measured copy bandwidth {copy_bandwidth / 1e9:.0f} GB/s."
    report(title, table, notes, device=args.device, record=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
