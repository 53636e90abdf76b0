"""`alignfast demo` end to end: wall time by phase, fast backend vs the reference backend, interleaved rounds.

    python -m bench.bench_demo [--rounds 5] [--record] [--quick] [--threads N]

The demo's budget is 5 minutes on 2 CPU cores (issue 6); this measures it instead of asserting it. Each call runs
the whole demo (the same seed, so the same rollouts whichever backend): held-out scoring before training,
Align-Pro training and scoring, Oracle, Aligner and Proxy-RLHF arms. --quick trains 640 episodes per arm instead of
3200.

Timing (bench/harness.run_rounds): --rounds rounds, each running both backends in turn (the order rotated), after
an untimed 64-episode warm-up of each (imports, model loading, the extension's first calls); the speed-up is the
median over rounds of the per-round time ratio, with its IQR. Phase columns are medians over the runs, in seconds;
peak extra memory is the rise of the resident set over one run (harness.peak_resident_growth), in the last round.
The held-out score and win rate come from the seeded run and must not change from round to round; the table says
"varies" if they do. The two backends may differ from each other: they agree to float32 rounding per step
(tests/trainer/test_parity.py), and over a whole run one rounding difference eventually changes a sampled token.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile

import torch

from bench import harness

PHASES = ("eval_before_s", "align_pro_train_s", "align_pro_eval_s", "oracle_train_s", "oracle_eval_s", "aligner_s",
          "proxy_rlhf_s")
WARMUP_EPISODES = 64


def run_once(backend: str, episodes: int | None) -> dict:
    from alignfast.cli.demo import run_demo

    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        return run_demo(out, seed=0, episodes=episodes, backend=backend)


def _same_or_varies(values: list[float]) -> str:
    return f"{values[0]:.3f}" if len(set(values)) == 1 else "varies: " + ", ".join(f"{v:.3f}" for v in values)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu"], help="the demo runs on CPU")
    ap.add_argument("--rounds", type=int, default=harness.ROUNDS, help=f">= {harness.ROUNDS} with --record")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="640 episodes per arm instead of the world's 3200")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    harness.refuse_unrecordable(ap, args)
    if args.record and args.rounds < harness.ROUNDS:
        ap.error(f"--rounds must be >= {harness.ROUNDS} with --record (got {args.rounds})")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1 (got {args.rounds})")
    if args.threads:
        torch.set_num_threads(args.threads)

    episodes = 640 if args.quick else None
    results: dict[str, list[dict]] = {"reference": [], "fast": []}
    for backend in results:
        run_once(backend, WARMUP_EPISODES)

    def provider(backend):
        return lambda: lambda: results[backend].append(run_once(backend, episodes))

    rows = harness.run_rounds("", {b: provider(b) for b in results}, baselines=("reference",), rounds=args.rounds,
                              warmup=0, memory="resident")
    held_out = {}
    for row in rows:
        runs = results[row.provider][:args.rounds]  # the timed runs: the memory measure's run comes last
        if not runs or row.seconds is None:
            continue
        row.shape = f"demo, {runs[0]['episodes']} episodes/arm"
        align = [next(r for r in run["rows"] if r["name"] == "Align-Pro") for run in runs]
        held_out[row.provider] = [(a["mean"], a["win_rate"]) for a in align]
        row.extra = {**{p.removesuffix("_s"): f"{statistics.median(run['timings_s'].get(p, 0.0) for run in runs):.1f}"
                        for p in PHASES},
                     "Align-Pro held-out": _same_or_varies([a["mean"] for a in align]),
                     "win rate": _same_or_varies([a["win_rate"] for a in align])}
    repeatable = all(len(set(pairs)) == 1 for pairs in held_out.values())
    agree = len({pair for pairs in held_out.values() for pair in pairs}) == 1
    table = harness.format_table(rows, baseline="reference",
                                 extra_columns=tuple(p.removesuffix("_s") for p in PHASES)
                                 + ("Align-Pro held-out", "win rate")).replace("median ms", "wall ms")
    load = os.getloadavg()[0]
    notes = (f"Seed 0; phase columns: median seconds over the runs. Each backend's held-out score and win rate were "
             f"{'the same in every round' if repeatable else 'NOT the same in every round (see the table)'}; "
             f"the two backends {'agreed' if agree else 'differed (float32 rounding, see the docstring)'}. "
             f"Budget: 5 minutes on 2 cores. {harness.spread_note(rows)}").strip()
    print(f"{harness.device_description('cpu')}; load average {load:.1f} when done\n{table}\n{notes}")
    if args.record:
        harness.append_results("alignfast demo end to end (fast vs reference backend)", table, device="cpu",
                               rounds=args.rounds, notes=notes)


if __name__ == "__main__":
    main()
