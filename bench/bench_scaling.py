"""Align-Pro PPO steps on 1 vs N processes (the trainer under torch.distributed.run, gloo on CPU or NCCL
on GPUs): episodes per second and the step-time split, same global batch and seed.

Each provider is one launch of `python -m torch.distributed.run --nproc_per_node N` running
`bench_scaling.py --worker`, which trains the toy world of `alignfast demo` (its shipped prompter and
target, HFEngine per process, the demo's hyperparameters with 64 episodes per step) for warm-up + timed
steps and writes the main process's per-step timings. Launches are interleaved over rounds
(1, 2, 1, 2, ...); the table shows medians over all timed steps of all rounds and the spread
(min-max of the per-round medians).

What to expect: every phase but the update is split over the processes (sampling, the target, the
reward, log-probs: ~1/N of the rows each), the update runs G/N of the micro-batches per process plus
one gradient all-reduce per optimizer step. On the 2-core development CPU two processes share the two
cores that one process with 2 intra-op threads uses: 2x1 vs 1x2 is the fair comparison there
(same cores), 2x1 vs 1x1 is per-core scaling; on N GPUs the same command measures the real scaling.

    python -m bench.bench_scaling                     # 1x1, 1x2, 2x1 (processes x threads), CPU
    python -m bench.bench_scaling --providers 1x1 2x1 4x1 8x1 --device cuda --record
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ["prompter_gen", "target_gen", "reward", "logprobs", "update"]
REPO = Path(__file__).resolve().parents[1]


def worker(out: Path, steps: int, device: str) -> None:
    """One launch: train the toy world for `steps` steps; the main process writes each step's timings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignfast.toy import load_world
    from alignfast.trainer import AlignProConfig, AlignProTrainer
    from alignfast.trainer.distributed import launched_world_size

    world = load_world()
    n = launched_world_size()
    cfg = dict(world.demo_config)
    # The demo's global batch (64 episodes: 32 x 1 x 2) split into micro-batches of 8 so that any of
    # 1, 2, 4, 8 processes gets whole micro-batches; the same for every process count.
    cfg.update(per_device_train_batch_size=8, gradient_accumulation_steps=4, num_mini_batches=2, max_steps=steps,
               output_dir=str(out / f"run-{n}"), overwrite_output_dir=True, save_strategy="no",
               rewrite_template=world.rewrite_template, target_prompt_template=world.target_prompt_template,
               device=device if n == 1 else None)
    tok = AutoTokenizer.from_pretrained(world.prompter_path)
    trainer = AlignProTrainer(AlignProConfig(**cfg), AutoModelForCausalLM.from_pretrained(world.prompter_path), tok,
                              world.target_path, reward_funcs=world.reward_funcs, train_dataset=world.train_prompts)
    result = trainer.train()
    if trainer.processes.is_main:
        rows = [{k: m[k] for k in m if k.startswith("timing_s/") or k == "objective/scores"} for m in result.history]
        (out / f"timings-{n}.json").write_text(json.dumps({"batch": trainer.config.rollout_batch_size, "steps": rows}))


def launch(n: int, threads: int, out: Path, steps: int, device: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           str(Path(__file__).resolve()), "--worker", "--out", str(out), "--steps", str(steps), "--device", device]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"bench_scaling: {n} processes failed:\n{done.stderr[-4000:]}")
    return json.loads((out / f"timings-{n}.json").read_text())


def check_same_first_step(provider: tuple, step: dict, first: dict) -> None:
    """N processes reproduce one (the trainer's parity tests): every launch's first step scores the same rollouts,
    so its mean reward equals the first launch's. A launch that does not (a broken shard of the prompts, a rank
    that trains on other rows) is refused rather than timed; `first` keeps the first launch's step."""
    from bench.harness import ProviderMismatch

    if not first:
        first.update(step, provider=provider)
        return
    a, b = step["objective/scores"], first["objective/scores"]
    if abs(a - b) > 1e-6 + 1e-6 * abs(b):
        raise ProviderMismatch(f"bench_scaling: {provider[0]}x{provider[1]}: first step objective/scores {a:.6g}, "
                               f"{first['provider'][0]}x{first['provider'][1]}: {b:.6g}: the launches no longer "
                               "train alike; not timed")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--providers", nargs="+", default=["1x1", "1x2", "2x1"],
                   help="PROCESSESxTHREADS each (torch intra-op threads per process); the first is the baseline")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="PPO steps per launch; the first is a warm-up")
    p.add_argument("--device", default="cpu")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    p.add_argument("--quick", action="store_true", help="one round of 1 timed step, 1x1 and 2x1 only")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.providers = 1, 2, ["1x1", "2x1"]
    if args.worker:
        worker(args.out, args.steps, args.device)
        return

    providers = [tuple(int(x) for x in spec.split("x")) for spec in args.providers]
    timed: dict[tuple, list[dict]] = {pv: [] for pv in providers}
    round_medians: dict[tuple, list[float]] = {pv: [] for pv in providers}
    batch = None
    first: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for pv in providers:  # interleaved: 1x1, 1x2, 2x1, 1x1, ...
                res = launch(*pv, Path(tmp) / f"round{r}", args.steps, args.device)
                batch = res["batch"]
                check_same_first_step(pv, res["steps"][0], first)
                steps = res["steps"][1:]  # the first step is a warm-up
                timed[pv] += steps
                round_medians[pv].append(statistics.median(s["timing_s/step"] for s in steps))
                print(f"round {r}: {pv[0]} process(es) x {pv[1]} thread(s): median step {round_medians[pv][-1]:.3f} s",
                      file=sys.stderr)

    from bench.harness import append_results, device_description, mark_quick_run

    base = statistics.median(s["timing_s/step"] for s in timed[providers[0]])
    header = ["processes x threads", "episodes/s", "median step s (spread over rounds)", f"vs {args.providers[0]}",
              *[f"{ph} s" for ph in PHASES]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for pv in providers:
        n = pv[0]
        step = statistics.median(s["timing_s/step"] for s in timed[pv])
        spread = f"{min(round_medians[pv]):.3f}-{max(round_medians[pv]):.3f}"
        phases = [f"{statistics.median(s[f'timing_s/{ph}'] for s in timed[pv]):.3f}" for ph in PHASES]
        lines.append(f"| {n} x {pv[1]} | {batch / step:.1f} | {step:.3f} ({spread}) | {base / step:.2f}x | "
                     + " | ".join(phases) + " |")
    table = "\n".join(lines)
    notes = (f"Toy world (alignfast demo's models, HFEngine target in every process), global batch {batch} episodes "
             f"(8 x 4 micro-batches x 2 mini-batches, num_ppo_epochs 4), {args.rounds} interleaved rounds of "
             f"{args.steps - 1} timed steps after one warm-up step each; phases are the main process's "
             f"(metrics.jsonl timing_s/*). {device_description(args.device)}; threads = OMP_NUM_THREADS per "
             f"process; system load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.")
    print(f"\n{table}\n\n{notes}")
    if args.record:
        mark_quick_run(args.quick)  # a quick run's section gets its own title (bench.harness.QUICK_TITLE)
        append_results("bench_scaling: Align-Pro PPO steps on 1 vs N processes", table, device=args.device,
                       notes=notes, rounds=args.rounds)


if __name__ == "__main__":
    main()
