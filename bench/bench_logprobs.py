"""token_logprobs against the ways RLHF code computes per-token log-probs today.

    python -m bench.bench_logprobs [--device cpu|cuda] [--record] [--quick] [--backward] [--dtype bf16]

Providers (each on the same logits, in the same run):
  torch eager            log_softmax(logits.float() / T).gather(tokens)          (materialises [N, V] fp32)
  trl selective_log_softmax   TRL's function: per-row logsumexp loop on CPU, its Triton kernel on CUDA
  trl triton logprob+entropy  trl.kernels.selective_log_softmax_and_entropy (CUDA)
  liger fused_selective_log_softmax  Liger-Kernel's Triton kernel (CUDA, forward only)
  torch.compile reference     torch.compile of alignfast.reference.token_logprobs
  alignfast / alignfast +entropy   this package's op (C++ on CPU, Triton on CUDA)

Columns: median time, peak extra memory, speed-up vs TRL's selective_log_softmax (the goal's baseline),
extra memory as a fraction of the logits' size, and on CUDA the fraction of the measured copy
bandwidth achieved for the bytes that must move (logits read once forward; read twice and dlogits
written once forward+backward).
"""

from __future__ import annotations

import argparse

import torch

from alignfast import reference
from alignfast.ops import token_logprobs
from bench import harness

BASELINE = "trl selective_log_softmax"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(B, T, V, dtype, device, *, grad: bool):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype).to(device)
    tokens = torch.randint(0, V, (B, T), generator=g).to(device)
    if grad:
        logits.requires_grad_()
    return logits, tokens


def _step(fn, logits, backward: bool):
    """fn(logits) -> tensor or tuple; forward only, or forward + backward of the sum of the outputs."""
    if not backward:
        def run():
            with torch.no_grad():
                return fn(logits)
        return run

    def run_bwd():
        logits.grad = None
        out = fn(logits)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.sum() for o in outs).backward()
        return None
    return run_bwd


def providers(B, T, V, dtype, device, temperature, backward):
    def eager():
        logits, tokens = make_inputs(B, T, V, dtype, device, grad=backward)
        return _step(lambda x: torch.log_softmax(x.float() / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
                     logits, backward)

    def trl_selective():
        from trl.trainer.utils import selective_log_softmax

        logits, tokens = make_inputs(B, T, V, dtype, device, grad=backward)
        return _step(lambda x: selective_log_softmax(x, tokens, temperature=temperature), logits, backward)

    def trl_triton_entropy():
        if device != "cuda":
            raise RuntimeError("CUDA only")
        from trl.kernels import selective_log_softmax_and_entropy

        logits, tokens = make_inputs(B, T, V, dtype, device, grad=backward)
        return _step(lambda x: selective_log_softmax_and_entropy(x, tokens, temperature=temperature), logits, backward)

    def liger():
        if device != "cuda":
            raise RuntimeError("CUDA only")
        if backward:
            raise RuntimeError("forward only (no autograd)")
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

        # Liger takes [B, T+1, V] (the prompt's last position included) and scores the first T.
        logits, tokens = make_inputs(B, T + 1, V, dtype, device, grad=False)
        return _step(lambda x: fused_selective_log_softmax(x, tokens[:, 1:].contiguous(), temperature), logits, False)

    def compiled_reference():
        logits, tokens = make_inputs(B, T, V, dtype, device, grad=backward)
        fn = torch.compile(reference.token_logprobs)
        return _step(lambda x: fn(x, tokens, temperature=temperature), logits, backward)

    def alignfast(entropy: bool):
        def factory():
            logits, tokens = make_inputs(B, T, V, dtype, device, grad=backward)
            return _step(lambda x: token_logprobs(x, tokens, temperature=temperature, return_entropy=entropy),
                         logits, backward)
        return factory

    table = {
        "torch eager": eager,
        BASELINE: trl_selective,
        "torch.compile reference": compiled_reference,
        "alignfast": alignfast(False),
        "alignfast +entropy": alignfast(True),
    }
    if device == "cuda":
        table["trl triton logprob+entropy"] = trl_triton_entropy
        table["liger fused_selective_log_softmax"] = liger
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args(argv)
    device = args.device
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    if device == "cuda":
        shapes = [(1, 2048, 32000), (8, 2048, 151936)] if not args.quick else [(1, 2048, 32000)]
    else:
        shapes = [(8, 256, 32000)] if not args.quick else [(2, 64, 32000)]
    reps = 5 if args.quick else 10
    rows = []
    bandwidth = harness.measured_copy_bandwidth(device) if device == "cuda" else None
    elt = torch.empty((), dtype=dtype).element_size()
    for B, T, V in shapes:
        shape = f"{B}x{T}x{V} {str(dtype).replace('torch.', '')}"
        logits_bytes = B * T * V * elt
        for row in harness.run_providers(shape, providers(B, T, V, dtype, device, args.temperature, args.backward),
                                         device=device, reps=reps):
            if row.peak_bytes is not None:
                row.extra["extra mem / logits"] = f"{row.peak_bytes / logits_bytes:.1%}"
            if bandwidth and row.seconds:
                moved = logits_bytes * (3 if args.backward else 1)
                row.extra["% copy BW"] = f"{moved / row.seconds / bandwidth:.0%}"
            rows.append(row)
    extra = ("extra mem / logits",) + (("% copy BW",) if bandwidth else ())
    table = harness.format_table(rows, baseline=BASELINE, extra_columns=extra)
    mode = "forward + backward" if args.backward else "forward"
    title = f"token_logprobs, {mode}, temperature {args.temperature}"
    print(f"\n{title} ({harness.device_description(device)})")
    if bandwidth:
        print(f"measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    print(table)
    if args.record:
        notes = f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s" if bandwidth else ""
        harness.append_results(title, table, device=device, notes=notes)


if __name__ == "__main__":
    main()
