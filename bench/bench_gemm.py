"""float32 CPU GEMMs: ATen's (torch.mm, what F.linear runs: MKL's sgemm) vs alignfast::mm on oneDNN's kernel.

    python -m bench.bench_gemm [--threads 1] [--rounds 5] [--record]

The shapes are those of one fast PPO step on SmolLM2-135M's shape (bench_trainer --preset smollm2-135m): a
micro-batch of M = 92 rows (2 episodes x 46 tokens) through each projection of a Llama layer and the LM head, in
the three orientations a linear layer runs (forward y = x W^T, dX = dy W, dW = dy^T x, each operand read in
place, as ops/linear.py passes them); the sampler's decode GEMMs (M = 4, the same on both paths, for
reference); and bench_linear_logprobs' [1024, 512] x [512, 32000]. GFLOP/s = 2MNK / median time.

Why (bench/NOTES-gemm.md): MKL runs its AVX2 kernel on non-Intel CPUs; oneDNN, also inside libtorch, picks
AVX-512 by the CPU's flags. torch.compile is not a separate row: inductor sends a lone GEMM to the same ATen mm.
Timing: bench/harness.py's interleaved rounds, fresh operands each round, median of several calls per round.
"""

from __future__ import annotations

import sys

import torch

from alignfast.ops import cpu_gemm
from alignfast.ops.linear import op
from bench import harness
from bench.bench_advantages import parse_args, report

BASELINE = "torch.mm (ATen)"
M_TRAIN, M_DECODE = 92, 4
PROJECTIONS = [("q/o", 576, 576), ("k/v", 576, 192), ("gate/up", 576, 1536), ("down", 1536, 576),
               ("LM head", 576, 49152)]


def cases(quick: bool) -> list[tuple[str, int, int, int, str]]:
    """(label, M, K, N, orientation) with orientation nn (a @ b), nt (a @ w.T: the forward), tn (a.T @ b: dW)."""
    out = []
    for name, d_in, d_out in PROJECTIONS[:3] if quick else PROJECTIONS:
        out.append((f"{name} forward", M_TRAIN, d_in, d_out, "nt"))
        out.append((f"{name} dX", M_TRAIN, d_out, d_in, "nn"))
        out.append((f"{name} dW", d_out, M_TRAIN, d_in, "tn"))
    if not quick:
        out.append(("decode gate/up", M_DECODE, 576, 1536, "nt"))
        out.append(("decode LM head", M_DECODE, 576, 49152, "nt"))
        out.append(("bench_linear_logprobs", 1024, 512, 32000, "nt"))
    return out


def operands(M: int, K: int, N: int, orientation: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(K, M, generator=g).t() if orientation == "tn" else torch.randn(M, K, generator=g)
    b = torch.randn(N, K, generator=g).t() if orientation == "nt" else torch.randn(K, N, generator=g)
    return a, b


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    if args is None or args.device != "cpu":
        print("bench_gemm is a CPU benchmark (--device cpu)", file=sys.stderr)
        return 2
    if not cpu_gemm.onednn_available():
        print("oneDNN's matmul is not reachable here (extension not built, or libtorch without it)", file=sys.stderr)
        return 2
    # Outputs of up to 113 MB are allocated per call: from the heap, as in a training process
    # (harness.normal_allocator), not mmapped and page-faulted in afresh as under the harness's memory setting.
    harness.normal_allocator()
    mm = op("mm")
    rows = []
    # Every shape on oneDNN, including those under the size rule that keeps small GEMMs on ATen in use
    # (cpu_gemm.min_macs_per_thread): this table measures the libraries themselves.
    with cpu_gemm.use("onednn"), cpu_gemm.smallest_gemm(0):
        for label, M, K, N, orient in cases(args.quick):
            flops = 2 * M * K * N
            reps = max(3, min(50, int(5e9 / flops))) | 1  # odd: the harness takes a median of one call
            providers = {BASELINE: lambda ab: (lambda: torch.mm(*ab)),
                         "alignfast mm (oneDNN)": lambda ab: (lambda: mm(*ab))}
            shape = f"{label}: {M}x{K}x{N} {orient}"
            got = harness.run_rounds(shape, providers, inputs=lambda r, M=M, K=K, N=N, o=orient: operands(M, K, N, o, r),
                                     rounds=args.rounds, reps=reps, warmup=2, baselines=(BASELINE,),
                                     measure_memory=False)
            for r in got:
                if r.seconds:
                    r.extra["GFLOP/s"] = f"{flops / r.seconds / 1e9:.0f}"
            rows += got
    table = harness.format_table(rows, baseline=BASELINE, extra_columns=("GFLOP/s",))
    notes = (f"float32, torch threads {torch.get_num_threads()}, CPU vendor {cpu_gemm.cpu_vendor() or 'unknown'}, "
             f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}. Speed-up: per-round time of torch.mm "
             f"over alignfast's, median (IQR) over {args.rounds} rounds. {harness.spread_note(rows)}").strip()
    report("float32 CPU GEMM: ATen (MKL) vs oneDNN", table, notes, device="cpu", record=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
