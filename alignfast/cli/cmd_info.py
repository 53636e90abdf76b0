"""`alignfast info`: the same report as `python -m alignfast.info`."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="which implementation runs each op on each device, and why",
                       description="Prints versions, whether the compiled extension loaded (and why not), and per "
                                   "op and device the active implementation: C++ CPU, CUDA C++, Triton or reference.")
    p.set_defaults(run=run)


def run(args, extra) -> int:
    from alignfast.info import report

    print(report())
    return 0
