"""Shared pieces of the vocabulary-wide benchmarks (bench_logprobs, bench_linear_logprobs):
argument parsing, the forward / forward+backward step, and the run-annotate-print-record loop."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench import harness

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(doc: str, argv=None, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """Common flags; returns (args, device, dtype) with dtype defaulting to fp32 on CPU and bf16 on CUDA."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--rounds", type=int, default=harness.ROUNDS, help="interleaved rounds (>= 5 to record)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run (CPU)")
    parser.add_argument("--clock", default="wall", choices=sorted(harness.CLOCKS),
                        help="CPU: wall time, or process CPU time (all threads; with --threads 1 the "
                             "kernels' own cost, which the machine's load does not inflate)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    harness.refuse_unrecordable(parser, args)
    if args.rounds < 1 or (args.record and args.rounds < harness.ROUNDS):
        parser.error(f"--rounds must be >= 1, and >= {harness.ROUNDS} with --record (got {args.rounds})")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1 (got {args.threads})")
    if args.clock != "wall" and args.device != "cpu":
        parser.error("--clock cpu times CPU devices only")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, args.device, DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]


# Tolerances of the first-round comparison (harness.Check), by the less precise dtype of the two outputs: float32
# log-probs and gradients from different reduction orders; bfloat16 ones rounded at 2^-8 relative.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-3), torch.float16: (5e-3, 1e-4)}


def step(fn: Callable[[], object], leaves, backward: bool) -> Callable[[], object]:
    """The timed call: fn() under no_grad, returning its output, or fn() and the backward of the sum of its outputs,
    returning the leaves' gradients (what harness.Check compares)."""
    if not backward:
        def run():
            with torch.no_grad():
                return fn()
        return run

    def run_bwd():
        for leaf in leaves:
            leaf.grad = None
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.sum() for o in outs if o is not None).backward()
        return tuple(leaf.grad for leaf in leaves)
    return run_bwd


def run(shapes, *, inputs, providers, label, logits_bytes, floor=None, floor_column: str = "", baseline: str,
        also_vs: tuple[str, ...] = (), title: str, device: str, rounds: int, reps: int, warmup: int, record: bool,
        notes: str = "", clock: str = "wall", check: harness.Check | None = None) -> list:
    """For each shape: harness.run_rounds over providers(shape) (name -> factory(inputs)) with inputs(shape)
    (round -> a fresh draw); annotate extra memory / logits (and floor(shape, seconds), a fraction of the
    device's measured roof, on CUDA); print the table; append it to RESULTS.md if record. Returns the rows.
    clock "cpu" times process CPU time (harness.CLOCKS) and says so in the title, so that the README table,
    which reads the wall-clock sections by their exact titles, never quotes it. check: harness.Check for the
    first round's outputs."""
    if clock != "wall":
        title += f", {clock} time, {torch.get_num_threads()} thread(s)"
    rows = []
    for shape in shapes:
        for row in harness.run_rounds(label(shape), providers(shape), inputs=inputs(shape), device=device,
                                      rounds=rounds, reps=reps, warmup=warmup, baselines=(baseline, *also_vs),
                                      clock=clock, check=check):
            if row.peak_bytes is not None:
                row.extra["extra mem / logits"] = f"{row.peak_bytes / logits_bytes(shape):.1%}"
            if floor is not None and row.seconds:
                row.extra[floor_column] = f"{floor(shape, row.seconds):.0%}"
            rows.append(row)
            print(f"  {row.shape} {row.provider}: " + (f"{row.seconds * 1e3:.1f} ms" if row.seconds else row.error),
                  flush=True)
    extra = ("extra mem / logits",) + ((floor_column,) if floor is not None else ())
    table = harness.format_table(rows, baseline=baseline, extra_columns=extra, also_vs=also_vs)
    notes = " ".join(n for n in (notes, harness.spread_note(rows)) if n)
    print(f"\n{title} ({harness.device_description(device)}; {harness.load_average()})")
    if notes:
        print(notes)
    print(table)
    if record:
        harness.append_results(title, table, device=device, notes=notes)
    return rows
