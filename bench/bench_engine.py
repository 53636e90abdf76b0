"""Frozen-target generation throughput: HFEngine vs per-prompt `generate` vs padded batched `generate`.

    python -m bench.bench_engine [--device cpu|cuda] [--prompts 64 256 512] [--rounds 5] [--record] [--quick]

Workload: prompts of random token ids with lengths uniform in [8, 256], sampled at temperature 1
(top_k off in generate, so every provider samples the same distribution). Completion lengths vary as
in real rollouts: a set of EOS ids holding 1/--mean-length of the vocabulary is chosen, and a random
model's next-token distribution is close to uniform, so a row stops with probability about
1/--mean-length per step, capped at --max-new-tokens. Providers draw different random numbers, so
their token counts differ a little: each call returns the tokens it made, and the speed-up columns compare
tokens/s, not seconds.
--temperature 0 decodes greedily instead: every provider then makes the same tokens, but a random
model's greedy walk falls into cycles that rarely meet an EOS id, so most rows run to the cap.

Providers, all on the same random-weight model:
  naive     model.generate per prompt (batch 1, no padding); skipped above --naive-max-prompts (256)
            prompts: a round takes minutes
  padded    model.generate on left-padded batches of --padded-batch prompts in arrival order: the
            plain batched baseline; every row runs until the batch's slowest row ends
  engine    HFEngine (length buckets, token budget, row retirement, dedupe)
Timing (bench/harness.run_rounds): --rounds interleaved rounds (order rotated), each on a fresh prompt set
shared by the providers, after one warm-up call each; the speed-up vs naive and vs padded is the median over
rounds of the per-round tokens/s ratio, with its IQR. Table: median seconds per call, median tokens per call,
tokens/s (median tokens / median seconds), the speed-ups, and peak extra memory: the rise of the process's
resident set over one call (harness.peak_resident_growth; profiling every op of a generation run costs more memory
than the run).

Models: "tiny" (CPU default: Llama, hidden 256, 4 layers, vocab 8192) and "0.5b" (a Qwen2.5-0.5B-sized
Llama config: hidden 896, 24 layers, 14 heads / 2 KV heads, vocab 151936; bf16; GPU default).
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

from bench.harness import (ROUNDS, Row, append_results, device_description, format_table, refuse_unrecordable,
                           run_rounds, spread_note)

CONFIGS = {
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
}


def build_model(name: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**CONFIGS[name], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval().requires_grad_(False)


def make_prompts(count: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def eos_set(vocab: int, mean_length: float, seed: int) -> list[int]:
    k = max(1, round(vocab / mean_length))
    return sorted(random.Random(seed + 1).sample(range(3, vocab), k))


def completion_length(row: list[int], eos: set[int]) -> int:
    for i, t in enumerate(row):
        if t in eos:
            return i + 1
    return len(row)


def gen_kwargs(args, eos: list[int]) -> dict:
    kw = dict(max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=0)
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0)
    else:
        kw.update(do_sample=False)
    return kw


def naive(model, prompts, args, eos) -> int:
    kw, eos_ids, device = gen_kwargs(args, eos), set(eos), model.device
    tokens = 0
    for p in prompts:
        ids = torch.tensor([p], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        tokens += completion_length(out[0, len(p):].tolist(), eos_ids)
    return tokens


def padded(model, prompts, args, eos) -> int:
    kw, eos_ids, device = gen_kwargs(args, eos), set(eos), model.device
    tokens = 0
    for start in range(0, len(prompts), args.padded_batch):
        chunk = prompts[start:start + args.padded_batch]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(ids.to(device), attention_mask=mask.to(device), **kw)
        tokens += sum(completion_length(row, eos_ids) for row in out[:, width:].tolist())
    return tokens


def engine_provider(model, args, eos):
    from alignfast.rollout import HFEngine

    engine = HFEngine(model, None, eos_token_id=eos, max_batch_tokens=args.max_batch_tokens)
    # the defaults resolved, for the table's title
    args.max_batch_tokens, args.max_batch_rows = engine.max_batch_tokens, engine.max_batch_size

    def run(prompts) -> int:
        out = engine.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              seed=0)
        return sum(len(c[0].token_ids) for c in out)

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=sorted(CONFIGS), default=None, help="default: tiny on cpu, 0.5b on cuda")
    p.add_argument("--prompts", type=int, nargs="+", default=None, help="prompt counts (default 64 256 512)")
    p.add_argument("--min-len", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--mean-length", type=float, default=48.0, help="expected completion length before the cap")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--padded-batch", type=int, default=64)
    p.add_argument("--max-batch-tokens", type=int, default=None, help="HFEngine budget (default: the engine's)")
    p.add_argument("--providers", nargs="+", default=["naive", "padded", "engine"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=ROUNDS,
                   help=f"interleaved rounds, each on a fresh prompt set (>= {ROUNDS} with --record)")
    p.add_argument("--naive-max-prompts", type=int, default=256,
                   help="skip the per-prompt baseline above this many prompts (it takes minutes)")
    p.add_argument("--quick", action="store_true", help="64 prompts, 32 new tokens, 2 rounds unless --record")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)
    refuse_unrecordable(p, args)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_engine: --device cuda asked for but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model_name = args.model or ("0.5b" if args.device.startswith("cuda") else "tiny")
    counts = args.prompts or ([64] if args.quick else [64, 256, 512])
    if args.quick:
        args.max_new_tokens = min(args.max_new_tokens, 32)
        if not args.record and args.rounds == ROUNDS:  # a recorded table keeps ROUNDS rounds, quick or not
            args.rounds = 2
    if args.record and args.rounds < ROUNDS:
        p.error(f"--rounds must be >= {ROUNDS} with --record (got {args.rounds})")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1 (got {args.rounds})")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build_model(model_name, args.device, dtype)
    vocab = model.config.vocab_size
    eos = eos_set(vocab, args.mean_length, 0)

    providers = {"naive": lambda ps: naive(model, ps, args, eos),
                 "padded": lambda ps: padded(model, ps, args, eos),
                 "engine": engine_provider(model, args, eos)}
    rows: list[Row] = []
    for count in counts:
        names = [n for n in args.providers if not (n == "naive" and count > args.naive_max_prompts)]
        shape = f"{count} prompts, len {args.min_len}-{args.max_len}, new<={args.max_new_tokens}"
        # a fresh prompt set each round, the same for every provider in that round; each call returns its tokens
        measured = run_rounds(
            shape, {name: (lambda fn: lambda prompts: lambda: fn(prompts))(providers[name]) for name in names},
            inputs=lambda r, count=count: make_prompts(count, vocab, args.min_len, args.max_len, seed=count * 1000 + r),
            baselines=tuple(b for b in ("naive", "padded") if b in names), device=args.device, rounds=args.rounds,
            reps=1, warmup=1, work=True, memory="resident")
        for r in measured:
            if r.seconds:
                r.extra["tokens"] = r.extra.pop("work")
                r.extra["tok/s"] = f"{float(r.extra['tokens']) / r.seconds:.0f}"
            print(f"  {shape} {r.provider}: " + (f"{r.seconds:.3f} s median, {r.extra['tokens']} tokens" if r.seconds
                                                else f"failed: {r.error}"), flush=True)
        rows += measured

    title = (f"bench_engine: {model_name} model ({dtype}), "
             f"{'sampling T=' + str(args.temperature) if args.temperature else 'greedy'}, "
             f"EOS ~1/{args.mean_length:g} per step, padded batch {args.padded_batch}, "
             f"engine budget {args.max_batch_tokens} tokens"
             + (f" / {args.max_batch_rows} rows" if args.max_batch_rows else ""))
    baseline = "naive" if "naive" in args.providers else args.providers[0]
    table = format_table(rows, baseline=baseline, also_vs=("padded",) if baseline != "padded" else (),
                         extra_columns=("tokens", "tok/s"))
    spread = spread_note(rows)
    print(f"\n{title}\n{device_description(args.device)}\n\n{table}\n{spread}")
    if args.record:
        append_results(title, table, device=args.device, rounds=args.rounds,
                       notes="Speed-ups compare tokens/s, per round: providers sample different completion lengths "
                             "(the tokens column is the median per call). " + spread)
    return 0


if __name__ == "__main__":
    sys.exit(main())
