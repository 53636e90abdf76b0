"""linear_token_logprobs (log-probs from hidden states, no [N, V] logits) against the alternatives.

    python -m bench.bench_linear_logprobs [--device cpu|cuda] [--record] [--quick] [--backward] [--dtype bf16]
    python -m bench.bench_linear_logprobs --threads 1 --clock cpu [...]   (CPU seconds of one thread: the kernels'
        own cost, which a loaded machine does not inflate; bench/harness.py)

Providers (same hidden/weight/tokens, same run):
  torch eager               logits = hidden @ W.T, log_softmax(logits.float()).gather      (the baseline)
  trl chunked_logprob       trl.kernels.ChunkedLogProbFunction (Triton on CUDA, torch tiles on CPU),
                            with TRL's trainer chunk size (32768 vocabulary columns)
  liger fused linear CE     Liger-Kernel's fused linear cross entropy, reduction='none' (= -logprob) (CUDA)
  torch.compile reference   torch.compile of alignfast.reference.linear_token_logprobs
  alignfast                 this package's op (default chunk size)

Timing: bench/harness.py's interleaved rounds (--rounds, default 5), fresh inputs each round.
Columns: median time, peak extra memory, speed-up vs torch eager, extra memory as a fraction of the
materialised logits ([N, V] in the input dtype; the CPU goal is <= 1/8), and on CUDA the fraction of
the measured bf16/fp32 GEMM rate achieved for the FLOPs that must be done (2NHV forward, 6NHV
forward + backward: recomputing the logits in the backward is overhead this column charges).
"""

from __future__ import annotations

import torch

from alignfast import reference
from alignfast.ops import linear_token_logprobs
from bench import _vocab, harness

BASELINE = "torch eager"
TRL_VOCAB_CHUNK = 32768


def make_inputs(N, H, V, dtype, device, *, grad: bool, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).to(device)
    tokens = torch.randint(0, V, (N,), generator=g).to(device)
    if grad:
        hidden.requires_grad_()
        weight.requires_grad_()
    return hidden, weight, tokens


def measured_matmul_rate(device: str, dtype: torch.dtype, n: int = 8192) -> float:
    """FLOP/s of an n x n x n GEMM in dtype (the roof the linear op's GEMMs run against)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = harness.median_time(lambda: torch.mm(a, b), device=device, warmup=3, reps=10)
    return 2 * n ** 3 / seconds


_step = _vocab.step


def providers(N, H, V, dtype, device, backward):
    """name -> factory((hidden, weight, tokens)) -> the timed call."""
    def eager(inp):
        h, w, t = inp
        return _step(lambda: torch.log_softmax((h @ w.t()).float(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1),
                     (h, w), backward)

    def trl_chunked(inp):
        from trl.kernels import ChunkedLogProbFunction

        h, w, t = inp
        return _step(lambda: ChunkedLogProbFunction.apply(h, w, None, t, 1.0, TRL_VOCAB_CHUNK, None, 1.0, ())[0],
                     (h, w), backward)

    def liger(inp):
        if device != "cuda":
            raise RuntimeError("CUDA only")
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        h, w, t = inp
        return _step(lambda: LigerFusedLinearCrossEntropyFunction.apply(h, w, t, None, None, -100, 0.0, 0.0, "none")[0],
                     (h, w), backward)

    # Static shapes: a second shape in the same process would otherwise recompile it with dynamic shapes,
    # slower code than a fresh compile gets (dynamo's automatic dynamic). Compiled in the first warm-up.
    compiled = torch.compile(reference.linear_token_logprobs, dynamic=False)

    def compiled_reference(inp):
        h, w, t = inp
        return _step(lambda: compiled(h, w, t), (h, w), backward)

    def alignfast(inp):
        h, w, t = inp
        return _step(lambda: linear_token_logprobs(h, w, t), (h, w), backward)

    table = {BASELINE: eager, "trl chunked_logprob": trl_chunked, "torch.compile reference": compiled_reference,
             "alignfast": alignfast}
    if device == "cuda":
        table["liger fused linear CE"] = liger
    return table


def main(argv=None):
    args, device, dtype = _vocab.parse_args(__doc__, argv)
    if device == "cuda":
        shapes = [(2048, 4096, 32000), (16384, 4096, 151936)] if not args.quick else [(2048, 4096, 32000)]
    else:
        shapes = [(1024, 512, 32000)] if not args.quick else [(256, 256, 32000)]
    rate = measured_matmul_rate(device, dtype) if device == "cuda" else None
    elt = torch.empty((), dtype=dtype).element_size()
    flops = 6 if args.backward else 2  # x N H V: the GEMMs that must be done (a recompute is overhead)
    _vocab.run(
        shapes,
        inputs=lambda s: (lambda r: make_inputs(*s, dtype, device, grad=args.backward, seed=r)),
        providers=lambda s: providers(*s, dtype, device, args.backward),
        label=lambda s: f"N={s[0]} H={s[1]} V={s[2]} {str(dtype).replace('torch.', '')}",
        logits_bytes=lambda s: s[0] * s[2] * elt,
        floor=(lambda s, sec: flops * s[0] * s[1] * s[2] / sec / rate) if rate else None,
        floor_column="% GEMM rate",
        baseline=BASELINE,
        also_vs=("trl chunked_logprob", "torch.compile reference"),
        title=f"linear_token_logprobs, {'forward + backward' if args.backward else 'forward'}",
        device=device, rounds=args.rounds, reps=1 if device == "cpu" or args.quick else 3, warmup=1,
        record=args.record, clock=args.clock,
        check=harness.Check(_vocab.TOLERANCES, dtype=dtype,
                            skip={"liger fused linear CE": "returns -logprob (cross entropy)"}),
        notes=f"measured {str(dtype).replace('torch.', '')} GEMM rate {rate / 1e12:.0f} TFLOP/s" if rate else "")


if __name__ == "__main__":
    main()
