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
Both parts interleave the providers over --rounds rounds (after one warm-up round) and report the median
and the spread (min-max) per provider, and the ratio to the first provider in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench import harness
from bench.harness import Row, append_results, device_description, format_table


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(providers: dict, rounds: int, device: str) -> dict[str, list[float]]:
    """{name: [seconds per round]}: one warm-up call each, then `rounds` rounds calling every provider once."""
    for fn in providers.values():
        fn()
    _sync(device)
    times = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def rows_from(shape: str, times: dict[str, list[float]], extra: dict | None = None) -> list[Row]:
    out = []
    for name, ts in times.items():
        row = Row(shape, name, statistics.median(ts), None,
                  extra={"spread ms": f"{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}", **((extra or {}).get(name, {}))})
        out.append(row)
    return out


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


def bench_step(device, B, V, top_p, rounds, temperature=0.8):
    from alignfast import reference
    from alignfast.ops import propose_token

    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(B, V, generator=g, device=device) * 3
    excluded = torch.rand(B, V, generator=g, device=device) < 0.05
    uniforms = torch.rand(B, generator=g, device=device)
    providers = {
        "torch eager": lambda: eager_step(logits, excluded, temperature, top_p),
        "reference": lambda: reference.propose_token(logits, excluded, uniforms, temperature=temperature, top_p=top_p),
        "alignfast": lambda: propose_token(logits, excluded, uniforms, temperature=temperature, top_p=top_p),
    }
    times = interleaved(providers, rounds, device)
    rows = rows_from(f"B={B} V={V} top_p={top_p}", times)
    for r, (name, fn) in zip(rows, providers.items()):
        r.peak_bytes = harness.peak_extra_memory(fn, device=device)
    return rows


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
    counts = {}

    def accept_all(features, proposals):
        return torch.full((proposals.numel(),), 50.0, device=proposals.device), None

    def run_engine():
        out = engine.generate(prompts, max_new_tokens=new_tokens, temperature=1.0, seed=1)
        counts["HFEngine"] = sum(len(c[0].token_ids) for c in out)

    def run_accept():
        res = dec.decode(prompts, accept_all, seed=1)
        counts["proxy: accept"] = sum(len(t) for t in res.tokens)

    def run_proxy():
        with torch.no_grad():
            res = dec.decode(prompts, proxy.judge, seed=1)
        counts["proxy: untrained"] = sum(len(t) for t in res.tokens)
        counts["rej/token"] = float(res.rejections.sum()) / max(1, counts["proxy: untrained"])

    times = interleaved({"HFEngine": run_engine, "proxy: accept": run_accept, "proxy: untrained": run_proxy},
                        rounds, device)
    extra = {n: {"tokens": counts[n], "tok/s": f"{counts[n] / statistics.median(times[n]):.0f}"} for n in times}
    extra["proxy: untrained"]["rejections/token"] = f"{counts['rej/token']:.3f}"
    return rows_from(f"{name} Llama, B={B}, {new_tokens} new tokens", times, extra)


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
    notes = (f"Interleaved rounds: {args.rounds} (after one warm-up call each); medians, spread min-max. "
             "Memory column of the decoding table not measured.")
    if "step" in parts:
        shapes = [(64, 32000)] if args.quick else [(64, 32000), (64, 151936)]
        step_rows = []
        for B, V in shapes:
            for top_p in (1.0, 0.9):
                step_rows += bench_step(dev, B, V, top_p, args.rounds)
        t1 = format_table(step_rows, baseline="torch eager", extra_columns=("spread ms",))
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
                          extra_columns=("spread ms", "tokens", "tok/s", "rejections/token"))
        print("\nDecoding (speed-up vs HFEngine < 1 is the proxy's overhead):\n")
        print(t2)
        if args.record:
            append_results(f"bench_proxy ({dev}): proxied decoding vs the target's plain decoding", t2, device=dev,
                           notes=notes, rounds=args.rounds)


if __name__ == "__main__":
    main()
