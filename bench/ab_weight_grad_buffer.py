"""A/B of the LM head's kept gradient block (alignfast/ops/weight_grad_buffer.py) inside one process.

    python -m bench.ab_weight_grad_buffer [--value-head shared|separate] [--rounds 8] [--order with-first]

Two fast trainers of the smollm2-135m preset (the same seed, so the same rollouts), one built with the block and
one without it, step in turn, after one warm-up step each. Everything else is identical, including the embedding
paths of trainer/embedding_grad.py. The table gives the median step and update times of each, and per round the
time the block saved (without - with). The order within a round is fixed by --order; run both orders, because
the trainer that steps second is affected by what the first one left in the allocator and caches.

Separate bench_trainer runs against the reference do not resolve a difference of this size: between processes
the same code moves by ~±100 ms (bench/NOTES-trainer.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import harness
from bench.bench_trainer import Setup, load_target, make_trainer, make_world


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--value-head", default="shared", choices=["shared", "separate"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--order", default="with-first", choices=["with-first", "without-first"])
    args = ap.parse_args(argv)
    from alignfast.ops import weight_grad_buffer

    harness.normal_allocator()
    torch.set_num_threads(1)
    setup = Setup(finetune="full", value_head=args.value_head)
    register = weight_grad_buffer.register_if_worth
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = make_world("smollm2-135m", root)
        engine = load_target(world, "cpu")
        weight_grad_buffer.register_if_worth = lambda weight, owner=None: None
        try:
            without = make_trainer("fast", world, root / "without", "cpu", setup, engine)
        finally:
            weight_grad_buffer.register_if_worth = register
        with_block = make_trainer("fast", world, root / "with", "cpu", setup, engine)
        if without.head_grad_buffer is not None or with_block.head_grad_buffer is None:
            raise SystemExit("ab_weight_grad_buffer: the LM head got no block (not a fused CPU head above 32 MiB)")
        trainers = {"with": with_block, "without": without}
        if args.order == "without-first":
            trainers = {"without": without, "with": with_block}
        times = {name: {"step": [], "update": []} for name in trainers}
        for step in range(args.rounds + 1):
            for name, trainer in trainers.items():
                t0 = time.perf_counter()
                metrics, _ = trainer._train_step(step, None)
                if step:  # the first step of each is a warm-up
                    times[name]["step"].append(time.perf_counter() - t0)
                    times[name]["update"].append(metrics["timing_s/update"])
    print(f"{harness.device_description('cpu')}, value_head={args.value_head}, order {args.order}, "
          f"{args.rounds} rounds, {harness.load_average()}")
    print("| phase | with ms | without ms | saved per round, median ms (IQR) | saved in every round |")
    print("|---|---|---|---|---|")
    for phase in ("step", "update"):
        saved = [(a - b) * 1e3 for a, b in zip(times["without"][phase], times["with"][phase])]
        q1, q2, q3 = harness.quartiles(saved)
        print(f"| {phase} | {statistics.median(times['with'][phase]) * 1e3:.0f} | "
              f"{statistics.median(times['without'][phase]) * 1e3:.0f} | {q2:.0f} ({q1:.0f}-{q3:.0f}) | "
              f"{'yes' if min(saved) > 0 else 'no'} |")
    block = with_block.head_grad_buffer
    print(f"block lent {block.lent} times, busy {block.busy}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
