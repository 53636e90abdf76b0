"""Memory over a long run: the fast Align-Pro trainer alone for many PPO steps, resident memory after each.

A training run's micro-batches change their token counts at every step, and every GEMM's row count with them.
A process that keeps something per shape it has seen grows for as long as the run brings new counts: oneDNN's
primitive cache did, by ~1-3 MiB a shape, until `cpu::gemm_into` stopped sending it every row count as a new
shape (bench/NOTES-gemm.md, "Memory"). bench_trainer's steps come in one or two sizes and cannot show that; here
the prompts' lengths are drawn from a wide range, so the counts keep changing, as in a real run.

What is reported: RSS (VmRSS) after each step, per window of steps (last and highest value), the growth from the
end of the first window (step 10 in runs of 40 steps or more, else a quarter of the run) to the last step, the same
after glibc's malloc_trim (what is free heap rather than held), the distinct shapes sent to oneDNN and to the bf16
micro-kernels, and the median step time. On CUDA the allocator's reserved bytes are reported too. Nothing here is
timed against anything: it is a memory trace.

    python -m bench.bench_long_run                                   # cpu-small, 200 steps (~2 min)
    python -m bench.bench_long_run --preset smollm2-135m --steps 100 --threads 1 --record   # the real size (~8 min)
    python -m bench.bench_long_run --preset smollm2-135m --finetune lora --steps 100
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import harness
from bench.bench_trainer import PRESETS, Setup, apply_run_flags, load_target, make_trainer, make_world
from bench.harness import append_results, device_description


def varied_prompts(preset_name: str, n: int, seed: int = 0) -> list[str]:
    """n prompts of the preset's random words, each between a quarter of and twice the preset's prompt length."""
    p = PRESETS[preset_name]
    g = torch.Generator().manual_seed(seed)
    lo, hi = max(1, p["prompt_words"] // 4), 2 * p["prompt_words"]
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, p["vocab"] - 6, (int(k),), generator=g)) for k in lengths]


def rss_mib() -> float:
    return (harness._read_status_kib("VmRSS") or 0) / 1024


def shape_counts() -> tuple[int | None, int | None]:
    """(distinct oneDNN GEMM shapes, distinct bf16 brgemm shapes) sent so far; None without the extension."""
    from alignfast import _ext

    mod = _ext.load()
    if mod is None:
        return None, None
    return mod.onednn_shapes(), mod.bf16_gemm_shapes()


def windows(steps: int) -> list[tuple[int, int]]:
    """1-based inclusive step windows ending at step 10 (the warm-up: allocators and caches fill) and at each
    quarter of the run."""
    edges = sorted({min(10, steps), *(round(steps * q / 4) for q in (1, 2, 3, 4))})
    edges = [e for e in edges if e >= 1]
    out, start = [], 1
    for e in edges:
        if e >= start:
            out.append((start, e))
            start = e + 1
    return out


def run(preset_name: str, device: str, steps: int, setup: Setup, record: bool, exact_rows: int | None = None) -> str:
    """exact_rows: how many distinct row counts per GEMM shape family oneDNN gets as they are (None: the library's
    default; a huge value sends every count as it comes, as before bench/NOTES-gemm.md's fix)."""
    if preset_name not in PRESETS:
        raise SystemExit(f"bench_long_run: --preset must be one of {', '.join(sorted(PRESETS))}")
    harness.normal_allocator()  # glibc as a long-running process has it (bench_trainer.run does the same)
    from alignfast.ops import cpu_gemm

    knob = cpu_gemm.exact_row_counts(exact_rows) if exact_rows is not None else contextlib.nullcontext()
    with knob, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = make_world(preset_name, root)
        batch = PRESETS[preset_name]["batch"]
        world = dataclasses.replace(world, prompts=varied_prompts(preset_name, 64 * batch))
        engine = load_target(world, device)
        trainer = make_trainer("fast", world, root, device, setup, engine)
        rss, reserved, seconds = [], [], []
        for step in range(steps):
            t0 = time.perf_counter()
            trainer._train_step(step, None)
            if device == "cuda":
                torch.cuda.synchronize()
                reserved.append(torch.cuda.memory_reserved() / 2**20)
            seconds.append(time.perf_counter() - t0)
            rss.append(rss_mib())
            if (step + 1) % 10 == 0:
                print(f"step {step + 1}/{steps}: RSS {rss[-1]:.0f} MiB, {seconds[-1]:.2f} s", file=sys.stderr)
        before_trim = rss[-1]
        trimmed = rss_mib() if harness.malloc_trim() else None
        onednn, bf16 = shape_counts()
        del trainer, engine

    warm = windows(steps)[0][1]  # growth is counted from the end of the first window
    cols = ["steps", "RSS at the last step (MiB)", "highest RSS (MiB)", "median step s"]
    if reserved:
        cols.append("CUDA reserved at the last step (MiB)")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for a, b in windows(steps):
        cells = [f"{a}-{b}", f"{rss[b - 1]:.0f}", f"{max(rss[a - 1:b]):.0f}",
                 f"{statistics.median(seconds[a - 1:b]):.2f}"]
        if reserved:
            cells.append(f"{reserved[b - 1]:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    growth = before_trim - rss[warm - 1]
    summary = (f"Growth from step {warm} to step {steps}: {growth:+.0f} MiB"
               + (f"; after malloc_trim at the end: {trimmed - rss[warm - 1]:+.0f} MiB ({trimmed:.0f} MiB resident)"
                  if trimmed is not None else "")
               + (f". Distinct shapes sent: {onednn} to oneDNN, {bf16} to the bf16 micro-kernels" if onednn is not None
                  else "") + ".")
    exact_note = f" --exact-row-counts {exact_rows}" if exact_rows is not None else ""
    label = (f"{world.label}{setup.label()}, prompts of {max(1, PRESETS[preset_name]['prompt_words'] // 4)}-"
             f"{2 * PRESETS[preset_name]['prompt_words']} words")
    table = "\n".join(lines)
    print(f"\n{device_description(device)}, load average {os.getloadavg()[0]:.1f}\n{label}\n{table}\n{summary}")
    if record:
        append_results(f"bench_long_run ({preset_name}{setup.label()}): memory over {steps} PPO steps of the fast "
                       f"trainer", f"{label}\n\n{table}", device=device,
                       timing=f"one run of {steps} steps, RSS read after each",
                       notes=f"{summary} Command: `python -m bench.bench_long_run --preset {preset_name} --steps "
                       f"{steps}{' --finetune lora' if setup.finetune == 'lora' else ''} --threads "
                       f"{torch.get_num_threads()}{exact_note}`.")
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=None, help="PPO steps (default 200; --quick 20)")
    ap.add_argument("--finetune", default="full", choices=["full", "lora"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="20 steps")
    ap.add_argument("--exact-row-counts", type=int, default=None, metavar="N",
                    help="distinct row counts per GEMM shape family that oneDNN gets as they are (default: the "
                    "library's 8); 1000000 sends every count as it comes, as before the fix this bench checks")
    args = ap.parse_args(argv)
    harness.refuse_unrecordable(ap, args)
    steps = args.steps if args.steps is not None else (20 if args.quick else 200)
    if steps < 1:
        ap.error(f"--steps must be at least 1 (got {steps})")
    apply_run_flags(ap, args)
    run(args.preset, args.device, steps, Setup(finetune=args.finetune), args.record, args.exact_row_counts)


if __name__ == "__main__":
    main()
