"""`alignfast bench`: argument parsing (the work is in alignfast.cli.bench)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the microbenchmarks and print their tables",
                       description="Runs bench/bench_<NAME>.py from the source checkout (all of them without NAME) "
                                   "and prints each table: median time, peak extra memory, ratio to the baseline "
                                   "measured in the same run and, on GPU, the fraction of the hardware floor.")
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (see --list)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    p.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md, then regenerate README.md's performance table from it")
    p.add_argument("--quick", action="store_true", help="the smallest shapes only (recorded, with --record, under titles the README never quotes)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.set_defaults(run=run)


def run(args, extra) -> int:
    from alignfast.cli import bench

    if args.list:
        print("\n".join(bench.available()))
        return 0
    return bench.run(args.names, device=args.device, record=args.record, quick=args.quick)
