"""compute_advantages (KL rewards -> GAE -> whitening, fused) vs the Python GAE loops as TRL and verl write
them (bench/baselines.py), vs alignfast.reference, vs torch.compile of the reference.

    python -m bench.bench_advantages [--device cpu|cuda] [--record] [--quick] [--compile-max-t N]

Timing: bench/harness.py's interleaved rounds (--rounds, default 5), fresh inputs each round.
Inputs are float32 rollouts with right-padded response masks (lengths uniform in [T/2, T]: the layout
TRL's loop assumes; verl's and ours skip masked positions anywhere), k1 KL, gamma 1, lam 0.95, whitening on.
On CUDA the table adds "x floor": measured time / the time to move the bytes that must move once
(bench/NOTES-advantages.md) at the copy bandwidth measured in the same run, and a CUDA-graph row that
times the kernels without the Python wrapper and launch overhead.
torch.compile unrolls the reference's T-step loop, so its compile time grows with T (about 2 minutes at
T=256 and 10 at T=1024 on the 2-core development machine; compiling is CPU work on a GPU machine too);
shapes with T above --compile-max-t (default 256) get a row that says so.
"""

from __future__ import annotations

import argparse
import sys

import torch

import alignfast.ops as ops
from alignfast import reference
from bench import baselines, harness

SHAPES = [(8, 256), (64, 1024), (256, 4096)]
QUICK_SHAPES = [(8, 256), (64, 1024)]
KW = dict(kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, whiten=True)
LOOP_KW = dict(kl_coef=0.05, gamma=1.0, lam=0.95)
BASELINE = "TRL loop"
# A per-round column against it too, so that the README can quote alignfast against torch.compile at a T it
# compiles (8x256 with the default --compile-max-t): entries recorded before 2026-12-02 lack it.
COMPILED = "torch.compile(reference)"


# The four outputs (rewards, advantages, returns, kl) where the response mask keeps a position (TRL's loop leaves
# other values at padding); float32 GAE over T steps and whitening in different orders.
CHECK = harness.Check({torch.float32: (1e-4, 1e-4)}, view=lambda out, inp: tuple(t[inp[4]] for t in out))


class Skipped(RuntimeError):
    """A provider not run at this shape, with the reason (shown in the table)."""


def make_inputs(B: int, T: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=g) * 4
    ref_logprobs = logprobs + 0.1 * torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    scores = torch.randn(B, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T).expand(B, T) < lengths[:, None]
    return tuple(t.to(device) for t in (logprobs, ref_logprobs, values, scores, mask))


def bytes_that_must_move(B: int, T: int) -> int:
    """Read logprobs, ref_logprobs, values (4 B each) and the mask (1 B), write rewards, advantages, returns,
    kl (4 B each): 29 bytes per token, plus the scores. Whitening's second look at the advantages is extra."""
    return B * T * (3 * 4 + 1 + 4 * 4) + B * 4


def cuda_graph_callable(fn):
    """Capture fn() once in a CUDA graph; return a callable that replays it (kernels only, no Python) and returns
    the captured outputs (overwritten by each replay). Its `setup_peak_bytes` is the memory the warm-up call and
    the capture took beyond what was allocated before: the graph's pool is allocated here, not in a replay, so
    the harness's per-call measure alone would read ~0 for it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    def replay():
        graph.replay()
        return out

    replay.setup_peak_bytes = max(0, torch.cuda.max_memory_allocated() - before)
    return replay


def providers(T: int, device: str, compile_max_t: int) -> dict:
    """name -> factory(inputs) -> the timed call (inputs: make_inputs' tuple, drawn afresh each round)."""
    compiled = torch.compile(reference.compute_advantages, dynamic=False)  # compiled in the warm-up

    def compiled_factory(inputs):
        if T > compile_max_t:
            raise Skipped(f"not run, T > --compile-max-t {compile_max_t}: compiling the unrolled loop is too slow")
        return lambda: compiled(*inputs, **KW)

    table = {
        "alignfast": lambda inputs: (lambda: ops.compute_advantages(*inputs, **KW)),
        "TRL loop": lambda inputs: (lambda: baselines.trl_advantages(*inputs, **LOOP_KW)),
        "verl loop": lambda inputs: (lambda: baselines.verl_advantages(*inputs, **LOOP_KW)),
        "reference": lambda inputs: (lambda: reference.compute_advantages(*inputs, **KW)),
        COMPILED: compiled_factory,
    }
    if device == "cuda":
        table["alignfast (CUDA graph)"] = lambda inputs: cuda_graph_callable(
            lambda: ops.compute_advantages(*inputs, **KW))
    return table


def add_columns(rows, device: str, copy_bandwidth: float | None) -> None:
    """On CUDA, 'x floor' (time / bytes-once-at-copy-bandwidth) for every row."""
    by_shape = {}
    for r in rows:
        by_shape.setdefault(r.shape, {})[r.provider] = r
    for shape, group in by_shape.items():
        B, T = map(int, shape.split("x"))
        for r in group.values():
            if r.seconds is None:
                continue
            if copy_bandwidth:
                floor = bytes_that_must_move(B, T) / copy_bandwidth
                r.extra["x floor"] = f"{r.seconds / floor:.2f}"


def report(title: str, table: str, notes: str, *, device: str, record: bool) -> None:
    """Print the table with its device and notes; with record, append it to bench/RESULTS.md."""
    print(f"\n{title}: {harness.device_description(device)}\n")
    print(table)
    print("\n" + notes)
    if record:
        harness.append_results(title, table, device=device, notes=notes)


def parse_args(doc: str, argv, extra=None) -> argparse.Namespace | None:
    """--device, --record, --quick, --threads (+ extra(parser)); applies --threads. None: no CUDA device."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="two small shapes, fewer repetitions")
    parser.add_argument("--rounds", type=int, default=harness.ROUNDS, help="interleaved rounds (>= 5 to record)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (CPU; default: torch's choice)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    harness.refuse_unrecordable(parser, args)
    if args.rounds < 1 or (args.record and args.rounds < harness.ROUNDS):
        parser.error(f"--rounds must be >= 1, and >= {harness.ROUNDS} with --record (got {args.rounds})")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda but no CUDA device is available", file=sys.stderr)
        return None
    return args


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, lambda parser: parser.add_argument(
        "--compile-max-t", type=int, default=None,
        help="largest T at which torch.compile(reference) is compiled (default 256: compile time grows "
             "with T, and at 1024 and up it outlasts a 10-minute GPU session command; --quick: none)"))
    if args is None:
        return 2
    compile_max_t = args.compile_max_t if args.compile_max_t is not None else 256
    if args.quick:
        compile_max_t = 0
    reps = 1 if args.quick else 3

    copy_bandwidth = harness.measured_copy_bandwidth(args.device) if args.device == "cuda" else None
    rows = []
    for B, T in QUICK_SHAPES if args.quick else SHAPES:
        rows += harness.run_rounds(f"{B}x{T}", providers(T, args.device, compile_max_t),
                                   inputs=lambda r, B=B, T=T: make_inputs(B, T, args.device, seed=r),
                                   device=args.device, rounds=args.rounds, reps=reps, warmup=2,
                                   baselines=(BASELINE, "verl loop", COMPILED), check=CHECK)
    add_columns(rows, args.device, copy_bandwidth)
    extra = ("x floor",) if copy_bandwidth else ()
    table = harness.format_table(rows, baseline=BASELINE, extra_columns=extra, also_vs=("verl loop", COMPILED))
    title = f"compute_advantages ({args.device})"
    notes = (f"float32, right-padded masks, k1, gamma 1, lam 0.95, whiten on, torch threads "
             f"{torch.get_num_threads()}. Outputs compared before timing (masked positions). Speed-ups: per-round time "
             f"of the TRL-style loop (and verl-style loop) over "
             f"the provider's, median (IQR) over rounds. {harness.spread_note(rows)}").strip()
    if args.device == "cuda":
        notes += (" CUDA graph rows: peak extra memory is the graph's pool, taken when it is captured (a replay "
                  "allocates nothing).")
    if copy_bandwidth:
        notes += (f" x floor: time / (29 bytes per token once at the measured copy bandwidth "
                  f"{copy_bandwidth / 1e9:.0f} GB/s, read + write).")
    report(title, table, notes, device=args.device, record=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
