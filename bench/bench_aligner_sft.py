"""One Aligner SFT step: the fused correction loss vs the plain `logits -> cross_entropy` step.

Same model, same batch, same optimizer; one timed call = zero_grad + loss + backward + AdamW step:

    plain  model(...).logits over every position -> cross_entropy on the correction positions
           (alignfast.aligner backend="reference": the SFT step of transformers / TRL, written plainly)
    fused  backbone hidden states -> alignfast.ops.linear_token_logprobs on the correction rows only
           (backend="fast": no [tokens, V] logits, in the forward or the backward)

Timing: bench/harness.run_rounds, one step per provider per round, the order rotated from round to round
(--rounds, default 5 on CPU, 10 on CUDA); the table gives each one's median and IQR over rounds, the per-round
time ratio to plain (median and IQR), its peak extra memory over the loss and backward (model, gradient
buffers, optimizer state and batch excluded) and the same over the whole step. Goal (issue 11): peak extra memory of the
fused step <= 1/8 of the plain one at V = 32000..151936, and no slower.

Models: random-weight Llama (V=32000) and Qwen2 (V=151936, tied embeddings) shapes; rows of P prompt and
C correction tokens.

    python -m bench.bench_aligner_sft [--quick] [--record] [--device cuda]
"""

from __future__ import annotations

import argparse

import torch

from bench import harness
from bench.harness import append_results, device_description, format_table, peak_extra_memory, run_rounds, spread_note

PRESETS = {
    "cpu-llama-32k": dict(arch="llama", vocab=32000, hidden=128, layers=2, heads=4, kv_heads=4, inter=256,
                          batch=4, prompt=96, correction=64, dtype=torch.float32),
    "cpu-llama-32k-long": dict(arch="llama", vocab=32000, hidden=128, layers=2, heads=4, kv_heads=4, inter=256,
                               batch=8, prompt=256, correction=256, dtype=torch.float32),
    "cpu-qwen2-152k": dict(arch="qwen2", vocab=151936, hidden=128, layers=2, heads=4, kv_heads=2, inter=256,
                           batch=4, prompt=96, correction=64, dtype=torch.float32),
    "cuda-qwen2-0.5b": dict(arch="qwen2", vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2, inter=4864,
                            batch=8, prompt=512, correction=512, dtype=torch.bfloat16),
    "cuda-llama-1b-32k": dict(arch="llama", vocab=32000, hidden=2048, layers=16, heads=32, kv_heads=8, inter=5632,
                              batch=8, prompt=512, correction=512, dtype=torch.bfloat16),
}


def build(p: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls_cfg, cls_model = (Qwen2Config, Qwen2ForCausalLM) if p["arch"] == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = cls_cfg(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
                  num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                  max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=p["arch"] == "qwen2")
    torch.manual_seed(0)
    return cls_model(cfg).to(device=device, dtype=p["dtype"])


def make_batch(p: dict, device: str):
    """Prompts of P - (0..P/4) tokens (left-padded), corrections of C - (0..C/4) tokens + EOS (right-padded)."""
    from alignfast.aligner.data import EncodedRow, collate

    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(p["batch"]):
        P = p["prompt"] - int(torch.randint(0, p["prompt"] // 4, (1,), generator=g))
        C = p["correction"] - int(torch.randint(0, p["correction"] // 4, (1,), generator=g))
        ids = torch.randint(3, p["vocab"], (P + C,), generator=g).tolist()
        rows.append(EncodedRow(ids[:P], ids[P:] + [2]))
    return collate(rows, 0, device)


def run(name: str, device: str, rounds: int, record: bool) -> str:
    from alignfast.aligner.loss import CorrectionLoss

    p = PRESETS[name]
    model = build(p, device)
    batch = make_batch(p, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    losses = {"plain": CorrectionLoss(model, backend="reference"), "fused": CorrectionLoss(model, backend="fast")}

    def loss_and_backward(provider):
        # Gradient buffers stay allocated (they are training state, the same for both, like the optimizer's), so
        # the peak extra memory is what the loss itself needs.
        optimizer.zero_grad(set_to_none=False)
        loss = losses[provider](batch)
        loss.backward()
        return loss.detach()

    def step(provider):
        loss = loss_and_backward(provider)
        optimizer.step()
        return loss

    with torch.no_grad():
        check = {k: float(fn(batch)) for k, fn in losses.items()}
    # The first round's warm-up step also creates the optimizer state, so memory below is the step's own.
    rows = run_rounds("", {k: (lambda k=k: (lambda: step(k))) for k in losses}, baselines=("plain",), device=device,
                      rounds=rounds, reps=1, warmup=1, measure_memory=False)
    tokens = int(batch.query_mask.sum() + batch.response_mask.sum())
    n_loss = batch.num_tokens
    shape = (f"{p['arch']} V={p['vocab']} H={p['hidden']} L={p['layers']} B={p['batch']} "
             f"{tokens} tokens ({n_loss} scored) {str(p['dtype']).removeprefix('torch.')}")
    logits_bytes = tokens * p["vocab"] * torch.empty((), dtype=p["dtype"]).element_size()
    for row in rows:
        k, row.shape = row.provider, shape
        if row.seconds is None:
            continue
        peak = peak_extra_memory(lambda k=k: loss_and_backward(k), device=device)
        whole = peak_extra_memory(lambda k=k: step(k), device=device)
        row.peak_bytes = peak
        row.extra["peak / logits"] = f"{peak / logits_bytes:.2f}" if peak is not None else "n/a"
        row.extra["peak extra, whole step"] = _mib(whole)
        row.extra["loss at start"] = f"{check[k]:.6f}"
    table = format_table(rows, baseline="plain", extra_columns=("peak / logits", "peak extra, whole step",
                                                                 "loss at start"))
    mem = {r.provider: r.peak_bytes for r in rows}
    ratio = (mem["fused"] / mem["plain"]) if mem["fused"] is not None and mem["plain"] else float("nan")
    notes = (f"Median of {rounds} interleaved rounds (order rotated) of one step (zero_grad, loss, backward, AdamW "
             f"step) per provider, after one warm-up step each; speed-up: per-round time ratio, median (IQR). 'peak extra mem': loss + backward, gradient buffers already allocated; 'peak / "
             f"logits': that over the size of the [tokens, V] logits in the model's dtype ({logits_bytes / 2**20:.0f} "
             f"MiB); 'whole step' adds the AdamW step, whose foreach temporaries (about the size of the parameters) "
             f"are the same for both. Fused / plain peak extra memory (loss + backward): {ratio:.3f} (goal <= 0.125). "
             f"{spread_note(rows)}").strip()
    print(f"\n{device_description(device)}\n{table}\n{notes}")
    if record:
        append_results(f"bench_aligner_sft ({name}): one Aligner SFT step, fused vs plain logits -> cross_entropy",
                       table, device=device, notes=notes, rounds=rounds)
    return table


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS),
                    help="repeatable; default the cpu-* presets on CPU, the cuda-* ones on CUDA")
    ap.add_argument("--rounds", "--reps", type=int, default=None, dest="rounds",
                    help="interleaved rounds, one timed step per provider each (default 5 on CPU, 10 on CUDA; "
                         f">= {harness.ROUNDS} with --record)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="the first preset only, three rounds unless --record")
    args = ap.parse_args(argv)
    harness.refuse_unrecordable(ap, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = args.preset or sorted(k for k in PRESETS if k.startswith(args.device))
    rounds = args.rounds or (10 if args.device == "cuda" else 5)
    if args.record and rounds < harness.ROUNDS:
        ap.error(f"--rounds must be >= {harness.ROUNDS} with --record (got {rounds})")
    if args.quick:  # a recorded table keeps harness.ROUNDS rounds, quick or not
        presets, rounds = presets[:1], rounds if args.record else min(rounds, 3)
    for name in presets:
        run(name, args.device, rounds, args.record)


if __name__ == "__main__":
    main()
