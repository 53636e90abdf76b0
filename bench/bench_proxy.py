"""Proxy-RLHF: the fused proposal step against the plain PyTorch step, and proxied decoding against plain decoding.

    python -m bench.bench_proxy [--device cpu|cuda] [--record] [--quick] [--rounds 5] [--parts step,decode]
                                [--batch 64] [--new-tokens 32]

Part 1, one proposal step on logits [B, V] with a rejected-token mask (5% of tokens) and uniforms:
  torch eager      what one writes in PyTorch: masked_fill(-inf) / T, softmax, (top_p < 1: sort, cumsum,
                   mask, scatter back), multinomial on the probabilities, log of the chosen probability
  reference        alignfast.reference.propose_token (the spec: sort-based nucleus, inverse-CDF sampling)
  alignfast        alignfast.ops.propose_token (C++ on CPU, Triton on CUDA): no [B, V] softmax copy
Part 2, decoding B prompts of a random-weight Llama (bench_engine's "tiny" shape on CPU) for N tokens:
  HFEngine         the target's own batched sampling (alignfast.rollout.HFEngine), no proxy
  proxy: accept    ProxyDecoder with a judge that always accepts (the loop's own overhead: a feature
                   row and a proposal op per token)
  proxy: untrained ProxyDecoder with a fresh ProxyModel (P(accept) = 0.88: ~0.14 re-proposals per token)
Both parts run on harness.run_rounds: providers interleaved over --rounds rounds in rotated order (fresh inputs
each round for the step), medians and IQRs, and per-round speed-ups against the first provider (decoding:
tokens per second, since sampled completions end at random lengths). The step's alignfast output is checked
against the reference's (same uniforms: same tokens, same log-probs) before anything is timed.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench import harness
from bench.harness import append_results, device_description, format_table


# --- part 1: the step ----------------------------------------------------------------------------
def eager_step(logits, excluded, temperature, top_p):
    probs = torch.softmax(logits.float().masked_fill(excluded, float("-inf")) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    tokens = torch.multinomial(probs, 1).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()


# The eager step samples with torch.multinomial, not from the uniforms: its tokens are another draw.
STEP_CHECK = harness.Check(skip={"torch eager": "samples with torch.multinomial, not the given uniforms"})


def step_inputs(device, B, V, seed):
    """Logits, a 5% rejected-token mask and one uniform per row, drawn afresh each round."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(B, V, generator=g, device=device) * 3
    excluded = torch.rand(B, V, generator=g, device=device) < 0.05
    return logits, excluded, torch.rand(B, generator=g, device=device)


def bench_step(device, B, V, top_p, rounds, temperature=0.8):
    from alignfast import reference
    from alignfast.ops import propose_token

    providers = {
        "torch eager": lambda inp: lambda: eager_step(inp[0], inp[1], temperature, top_p),
        "reference": lambda inp: lambda: reference.propose_token(*inp, temperature=temperature, top_p=top_p),
        "alignfast": lambda inp: lambda: propose_token(*inp, temperature=temperature, top_p=top_p),
    }
    return harness.run_rounds(f"B={B} V={V} top_p={top_p}", providers,
                              inputs=lambda r: step_inputs(device, B, V, seed=r), baselines=("torch eager",),
                              device=device, rounds=rounds, check=STEP_CHECK)


# --- part 2: decoding ----------------------------------------------------------------------------
def bench_decode(device, B, new_tokens, rounds):
    from alignfast.rollout import HFEngine
    from alignfast.rollout.proxy_decoder import ProxyDecoder
    from alignfast.trainer.proxy_model import ProxyModel
    from bench.bench_engine import CONFIGS, build_model, make_prompts

    name = "tiny" if device == "cpu" else "0.5b"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = build_model(name, device, dtype)
    vocab = CONFIGS[name]["vocab_size"]
    prompts = make_prompts(B, vocab, 16, 64, seed=0)
    eos = [2]
    engine = HFEngine(model, None, eos_token_id=eos, pad_token_id=0)
    dec = ProxyDecoder(model, eos_ids=eos, pad_id=0, max_new_tokens=new_tokens, max_rejections_per_token=3,
                       temperature=1.0)
    torch.manual_seed(0)
    proxy = ProxyModel(model.config.hidden_size, model.config.hidden_size, 64).to(device)
    rejections = []

    def accept_all(features, proposals):
        return torch.full((proposals.numel(),), 50.0, device=proposals.device), None

    # Each call returns the tokens it generated (run_rounds' `work`): sampled completions end at random lengths,
    # so the speed-up compares tokens per second in the same round.
    def run_engine():
        out = engine.generate(prompts, max_new_tokens=new_tokens, temperature=1.0, seed=1)
        return sum(len(c[0].token_ids) for c in out)

    def run_accept():
        return sum(len(t) for t in dec.decode(prompts, accept_all, seed=1).tokens)

    def run_proxy():
        with torch.no_grad():
            res = dec.decode(prompts, proxy.judge, seed=1)
        tokens = sum(len(t) for t in res.tokens)
        rejections.append(float(res.rejections.sum()) / max(1, tokens))
        return tokens

    providers = {"HFEngine": run_engine, "proxy: accept": run_accept, "proxy: untrained": run_proxy}
    rows = harness.run_rounds(f"{name} Llama, B={B}, {new_tokens} new tokens",
                              {n: (lambda fn=fn: fn) for n, fn in providers.items()}, baselines=("HFEngine",),
                              device=device, rounds=rounds, work=True, memory="resident")
    for row in rows:
        if row.seconds:
            row.extra["tok/s"] = f"{float(row.extra['work']) / row.seconds:.0f}"
    for row in rows:  # the untrained proxy's median re-proposals per token (none if it could not run)
        if row.provider == "proxy: untrained" and rejections:
            row.extra["rejections/token"] = f"{statistics.median(rejections):.3f}"
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    p.add_argument("--quick", action="store_true", help="small shapes only")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--parts", default="step,decode", help="comma-separated: step, decode")
    p.add_argument("--batch", type=int, default=None, help="decoding: prompts (default 64; --quick 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="decoding: new tokens (default 32; --quick 16)")
    args = p.parse_args(argv)
    harness.refuse_unrecordable(p, args)
    dev = args.device
    parts = set(args.parts.split(","))
    print(f"device: {device_description(dev)}")
    notes = (f"harness.run_rounds: {args.rounds} rounds, providers interleaved, order rotated, fresh inputs per "
             "round; medians, IQR, per-round speed-ups (decoding: tokens per second, the completions' lengths "
             "being sampled). The proposal step's outputs are checked against the reference before timing.")
    if "step" in parts:
        shapes = [(64, 32000)] if args.quick else [(64, 32000), (64, 151936)]
        step_rows = []
        for B, V in shapes:
            for top_p in (1.0, 0.9):
                step_rows += bench_step(dev, B, V, top_p, args.rounds)
        t1 = format_table(step_rows, baseline="torch eager")
        print("\nOne proposal step (mask, temperature 0.8, top-p, sample, log-prob):\n")
        print(t1)
        if args.record:
            append_results(f"bench_proxy ({dev}): fused proposal step vs plain PyTorch", t1, device=dev, notes=notes,
                           rounds=args.rounds)
    if "decode" in parts:
        B = args.batch or (16 if args.quick else 64)
        new = args.new_tokens or (16 if args.quick else 32)
        dec_rows = bench_decode(dev, B, new, args.rounds)
        t2 = format_table(dec_rows, baseline="HFEngine",
                          extra_columns=("work", "tok/s", "rejections/token"))
        print("\nDecoding (speed-up vs HFEngine < 1 is the proxy's overhead):\n")
        print(t2)
        if args.record:
            append_results(f"bench_proxy ({dev}): proxied decoding vs the target's plain decoding", t2, device=dev,
                           notes=notes, rounds=args.rounds)


if __name__ == "__main__":
    main()
