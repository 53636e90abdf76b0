"""The README's performance table, generated from bench/RESULTS.md, so that no number in the README is typed
by hand: each README row names a RESULTS.md section (by title prefix), a table row in it (shape, provider)
and the ratio columns to quote; the newest section that has the row wins.

    python -m bench.readme_table            print the generated table
    python -m bench.readme_table --write    replace the README's table between its two markers
    python -m bench.readme_table --check    exit 1 if the README's table is not what RESULTS.md gives

`alignfast bench --record` runs --write after the benchmarks have appended their tables. A ratio cell
"1.52x (1.40-1.61)" is the median over interleaved rounds of the per-round speed-up and its inter-quartile
range (bench/harness.py); a bare "1.52x" comes from an older single-run table.

A per-round ratio cancels a slowdown that hits both providers of a round alike, not load in general: the
providers of a round run one after another, and a baseline made of many small OpenMP regions (TRL's per-row
loop, the GAE loops) stalls far more on a busy machine than one fused call, so load inflates alignfast's
speed-ups. A row is marked "indicative only" when the harness flagged its spread, or when its section was
recorded at a 1-minute load average at or above the cores the stamp reports ("N usable cores", from
os.sched_getaffinity; older stamps say "N CPUs", os.cpu_count(); with neither, its thread count).

Goals: "met" only when the lower quartile of the per-round ratios reaches the goal and the row is not marked;
"met at the median only (...)" when the median does but that is not so; "not met" otherwise.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
README = ROOT / "README.md"
BEGIN = "<!-- perf-table:begin: generated from bench/RESULTS.md by `python -m bench.readme_table --write`; do not edit -->"
END = "<!-- perf-table:end -->"

TL_FWD = "token_logprobs, forward, temperature 1.0"
TL_BWD = "token_logprobs, forward + backward, temperature 1.0"
TRL = "trl selective_log_softmax"
COMPILED = "torch.compile reference"


@dataclass
class Spec:
    what: str
    shape: str                       # as the README shows it
    section: str                     # RESULTS.md section title (a prefix of it where `prefix`)
    row_shape: str                   # the table's "shape" cell
    provider: str
    vs: tuple[tuple[str, str], ...]  # (column header in the table, label in the README)
    goals: tuple[tuple[str, float], ...] = ()  # (column header, minimum speed-up: see verdict)
    memory_vs: str | None = None     # a provider whose memory is quoted next to ours
    prefix: bool = False


def _speedup(provider: str) -> tuple[str, str]:
    return (f"speed-up vs {provider}", provider)


def _vs(provider: str) -> tuple[str, str]:
    return (f"vs {provider}", provider)


def specs() -> list[Spec]:
    rows = [Spec("`compute_advantages`", "64×1024", "compute_advantages (cpu)", "64x1024", "alignfast",
                 (_speedup("TRL loop"), _vs("verl loop")), memory_vs="TRL loop"),
            # the largest shape torch.compile of the GAE loop is timed at (its unrolled graph compiles for minutes
            # beyond T = 256: bench_advantages --compile-max-t)
            Spec("`compute_advantages`", "8×256", "compute_advantages (cpu)", "8x256", "alignfast",
                 (_speedup("TRL loop"), _vs("torch.compile(reference)")), memory_vs="torch.compile(reference)")]
    for title, what in ((TL_FWD, "`token_logprobs` forward"), (TL_BWD, "`token_logprobs` fwd+bwd")):
        for entropy in (False, True):
            for shape in ("8x256x32000", "4x512x151936"):
                for dtype in ("float32", "bfloat16"):
                    compiled = COMPILED + (" +entropy" if entropy else "")
                    rows.append(Spec(
                        what + (" +entropy" if entropy else ""), f"{shape.replace('x', '×')} {dtype}", title,
                        f"{shape} {dtype}", "alignfast" + (" +entropy" if entropy else ""),
                        (_speedup(TRL), _vs(compiled)),
                        goals=((f"speed-up vs {TRL}", 2.0), (f"vs {compiled}", 1.3)), memory_vs=compiled))
    rows += [
        Spec("`ppo_policy_loss_from_logits` fwd+bwd", "8×256×32000 float32",
             "ppo_policy_loss_from_logits, forward + backward, temperature 1.0", "8x256x32000 float32", "alignfast",
             (_speedup("reference (eager)"), _vs(COMPILED)), memory_vs="reference (eager)"),
        *[spec
          for dtype in ("float32", "bfloat16")
          for spec in (
              Spec("`linear_token_logprobs` forward", f"N=1024, H=512, V=32000 {dtype}",
                   "linear_token_logprobs, forward", f"N=1024 H=512 V=32000 {dtype}", "alignfast",
                   (_speedup("torch eager"), _vs("trl chunked_logprob"), _vs(COMPILED)), memory_vs="torch eager"),
              Spec("`linear_token_logprobs` fwd+bwd", f"N=1024, H=512, V=32000 {dtype}",
                   "linear_token_logprobs, forward + backward", f"N=1024 H=512 V=32000 {dtype}", "alignfast",
                   (_speedup("torch eager"), _vs("trl chunked_logprob"), _vs(COMPILED)),
                   goals=(("speed-up vs torch eager", 1.0),), memory_vs="torch eager"))],
        Spec("HF engine, 256 prompts (8–256 tokens)", "tiny Llama", "bench_engine: tiny model",
             "256 prompts, len 8-256, new<=128", "engine",
             (("speed-up vs naive", "per-prompt `generate` (tokens/s)"), ("vs padded", "padded batching (tokens/s)")),
             prefix=True),
        Spec("one PPO step, demo models", "V=51, H=64", "bench_trainer (demo)",
             "demo (alignfast.toy): V=51 H=64 L=2 B=64 R=16", "fast", (("per-round ratio (IQR)", "reference"),),
             memory_vs="reference", prefix=True),
        Spec("one PPO step, larger vocabulary", "V=16384, H=128, 4 layers", "bench_trainer (cpu-small)",
             "cpu-small: V=16384 H=128 L=4 B=16 R=32", "fast", (("per-round ratio (IQR)", "reference"),),
             memory_vs="reference", prefix=True),
    ]
    smollm2 = "smollm2-135m: V=49152 H=576 L=30 B=4 R=16"
    for label, suffix in (("full fine-tuning, separate critic", ""), ("LoRA r=16, separate critic", " finetune=lora"),
                          ("full fine-tuning, shared value head", " value_head=shared")):
        rows.append(Spec(f"one PPO step, SmolLM2-135M shape ({label})", "V=49152, H=576, 30 layers",
                         "bench_trainer (smollm2-135m", smollm2 + suffix, "fast", (("per-round ratio (IQR)", "reference"),),
                         goals=(("per-round ratio (IQR)", 1.5),), prefix=True))
    rows += [
        Spec("`alignfast demo` end to end", "four arms, 3200 episodes each",
             "alignfast demo end to end", "demo, 3200 episodes/arm", "fast", (_speedup("reference"),), prefix=True),
    ]
    return rows


@dataclass
class Section:
    title: str
    stamp: str                  # the line under the title: date, commit, device, load
    rows: list[dict[str, str]]  # one dict per table row, keyed by header


def parse_results(text: str) -> list[Section]:
    sections: list[Section] = []
    current: Section | None = None
    header: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            current, header = Section(line[3:].strip(), "", []), None
            sections.append(current)
        elif current is None:
            continue
        elif not current.stamp and re.match(r"\d{4}-\d{2}-\d{2}", line):
            current.stamp = line.strip()
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line.replace("|", "").strip()) <= set("-: "):
                current.rows.append(dict(zip(header, cells)))
        else:
            header = None  # a table ends at the first line that is not a table row
    return sections


_RATIO = re.compile(r"^\s*([0-9.]+)x(?:\s*\(([0-9.]+)-([0-9.]+)\))?")


def parse_ratio(cell: str) -> tuple[float, float | None, float | None] | None:
    m = _RATIO.match(cell or "")
    if not m:
        return None
    med = float(m.group(1))
    return (med, float(m.group(2)), float(m.group(3))) if m.group(2) else (med, None, None)


def find(sections: list[Section], spec: Spec) -> tuple[Section, dict, list[dict]] | None:
    """The newest section titled spec.section... with a (row_shape, provider) row that ran."""
    for section in reversed(sections):
        if not (section.title == spec.section or (spec.prefix and section.title.startswith(spec.section))):
            continue
        same_shape = [r for r in section.rows if r.get("shape") == spec.row_shape]
        for row in same_shape:
            first_ratio = row.get(spec.vs[0][0], "")
            if row.get("provider") == spec.provider and parse_ratio(first_ratio) is not None:
                return section, row, same_shape
    return None


def _memory(row: dict) -> str:
    mem = row.get("peak extra mem", "")
    frac = row.get("extra mem / logits")
    return f"{mem} ({frac} of logits)" if frac and mem not in ("", "n/a") else (mem or "—")


def _load(section: Section) -> tuple[float, int, str] | None:
    """(1-minute load average, cores, what they are) from the stamp, or None when either is missing."""
    load = re.search(r"load average ~?([0-9.]+)", section.stamp)
    for pattern, what in ((r"(\d+) usable cores", "cores"), (r"(\d+) cores\b", "cores"), (r"(\d+) CPUs\b", "CPUs"),
                          (r"(\d+) (?:torch )?threads?\b", "threads")):
        cores = re.search(pattern, section.stamp)
        if cores:
            break
    if load is None or cores is None or not float(load.group(1).rstrip(".")):
        return None
    return float(load.group(1).rstrip(".")), int(cores.group(1)), what


def overloaded(section: Section) -> str | None:
    """'load 2.0 on 2 cores' when the section was recorded at a load average >= its cores (None otherwise)."""
    found = _load(section)
    if found is None or found[0] < found[1]:
        return None
    load, cores, what = found
    return f"load {load:.1f} on {cores} {what}"


def verdict(ratio: tuple[float, float | None, float | None] | None, minimum: float, marks: list[str]) -> str:
    """A goal's verdict from (median, q1, q3) of the per-round ratios and the row's marks (spread, load)."""
    if ratio is None or ratio[0] < minimum:
        return "**not met**"
    med, q1, _ = ratio
    if q1 is None:
        return "met at the median only (no rounds)"
    if q1 < minimum:
        return f"met at the median only (IQR low {q1:.2f}×)"
    if marks:
        return f"met at the median only ({', '.join(marks)})"
    return "met"


def _stamp(section: Section) -> str:
    """date and commit, and the load when the table was recorded (newer entries)."""
    parts = section.stamp.split(",")
    date, commit = parts[0].strip(), (parts[1].strip().removeprefix("commit ") if len(parts) > 1 else "?")
    load = re.search(r"load average ([0-9.]+)", section.stamp)
    return f"{date} {commit}" + (f", load {load.group(1)}" if load else "")


def render(results_text: str) -> str:
    sections = parse_results(results_text)
    lines = ["| what | shape | alignfast vs baseline, same run: median ratio (IQR over rounds) | peak extra memory "
             "| goal | recorded |", "|---|---|---|---|---|---|"]
    for spec in specs():
        found = find(sections, spec)
        if found is None:
            lines.append(f"| {spec.what} | {spec.shape} | not recorded yet | | | |")
            continue
        section, row, same_shape = found
        ratios = []
        for col, label in spec.vs:
            if col not in row:  # a spec naming a column the bench does not write would drop it silently
                raise SystemExit(f"bench/readme_table.py: README row {spec.what!r} quotes column {col!r}, which the "
                                 f"RESULTS.md section {section.title!r} ({section.stamp[:40]}) lacks")
            r = parse_ratio(row[col])
            if r is None:
                ratios.append(f"{label}: {row[col] or 'n/a'}")
                continue
            med, q1, q3 = r
            ratios.append(f"{med:.2f}× {label}" + (f" ({q1:.2f}–{q3:.2f})" if q1 is not None else " (no rounds)"))
        marks = []
        if row.get("spread", "").startswith("WARNING"):  # the harness flagged it: IQR > SPREAD_WARNING of the median
            marks.append(f"spread {row['spread'].removeprefix('WARNING ')}")
        load = overloaded(section)
        if load:
            marks.append(load)
        if marks:
            ratios.append(f"**{', '.join(marks)}: indicative only**")
        memory = _memory(row)
        if spec.memory_vs:
            other = next((r for r in same_shape if r.get("provider") == spec.memory_vs), None)
            if other is not None and other.get("peak extra mem"):
                memory += f"; {spec.memory_vs}: {_memory(other)}"
        verdicts = []
        for col, minimum in spec.goals:
            r = parse_ratio(row.get(col, ""))
            label = col.removeprefix("speed-up ").removeprefix("vs ")
            if col == "per-round ratio (IQR)":  # the trainer tables' per-round ratio is fast / reference
                label = "reference"
            verdicts.append(f"≥{minimum:g}× {label}: {verdict(r, minimum, marks)}")
        lines.append(f"| {spec.what} | {spec.shape} | {', '.join(ratios)} | {memory} | {'; '.join(verdicts)} "
                     f"| {_stamp(section)} |")
    return "\n".join(lines)


def replace_between_markers(readme_text: str, table: str) -> str:
    start, end = readme_text.find(BEGIN), readme_text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    return readme_text[:start + len(BEGIN)] + "\n" + table + "\n" + readme_text[end:]


def readme_table(readme_text: str) -> str:
    start, end = readme_text.find(BEGIN), readme_text.find(END)
    return readme_text[start + len(BEGIN):end].strip("\n") if start >= 0 and end > start else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the README's table in place")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's table is stale")
    args = parser.parse_args(argv)
    table = render(RESULTS.read_text())
    readme = README.read_text()
    if args.check:
        if readme_table(readme) != table:
            print("README.md's performance table differs from `python -m bench.readme_table`", file=sys.stderr)
            return 1
        return 0
    if args.write:
        README.write_text(replace_between_markers(readme, table))
        print(f"README.md: performance table regenerated from {RESULTS.name}")
        return 0
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
