"""`alignfast demo` end to end: wall time by phase, fast backend vs the reference backend in the same run.

    python -m bench.bench_demo [--record] [--quick] [--threads N]

The demo's budget is 5 minutes on 2 CPU cores (issue 6); this measures it instead of asserting it. Each
backend runs the whole demo once (the same seed, so the same rollouts): held-out scoring before training,
Align-Pro training, Oracle training, scoring after. --quick trains 640 episodes per arm instead of 3200.
A single run per backend: the demo is long enough that the run-to-run spread on an idle machine is a few
percent, and the table says which machine load it ran under.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

import torch

from bench import harness

PHASES = ("eval_before_s", "align_pro_train_s", "align_pro_eval_s", "oracle_train_s", "oracle_eval_s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu"], help="the demo runs on CPU")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="640 episodes per arm instead of the world's 3200")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from alignfast.cli.demo import run_demo

    harness.normal_allocator()  # glibc as a long-running process ends up (bench_trainer's note on trimming)
    episodes = 640 if args.quick else None
    rows = []
    for backend in ("reference", "fast"):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                result = run_demo(out, seed=0, episodes=episodes, backend=backend)
            wall = time.perf_counter() - t0
        timings = result["timings_s"]
        align = next(r for r in result["rows"] if r["name"] == "Align-Pro")
        row = harness.Row(f"demo, {result['episodes']} episodes/arm", backend, wall, None)
        row.extra = {**{p.removesuffix("_s"): f"{timings.get(p, 0.0):.1f}" for p in PHASES},
                     "Align-Pro held-out": f"{align['mean']:.3f}", "win rate": f"{align['win_rate']:.3f}"}
        rows.append(row)
    table = harness.format_table(rows, baseline="reference",
                                 extra_columns=tuple(p.removesuffix("_s") for p in PHASES)
                                 + ("Align-Pro held-out", "win rate"))
    load = os.getloadavg()[0]
    print(f"{harness.device_description('cpu')}; load average {load:.1f} when done")
    print(table.replace("median ms", "wall ms"))
    if args.record:
        harness.append_results("alignfast demo end to end (fast vs reference backend)",
                               table.replace("median ms", "wall ms"), device="cpu", timing="one run per backend",
                               notes=f"One run per backend, seed 0; phase columns in seconds; load average "
                                     f"{load:.1f}. Budget: 5 minutes on 2 cores.")


if __name__ == "__main__":
    main()
