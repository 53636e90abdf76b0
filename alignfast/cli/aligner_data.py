"""Correction rows for `alignfast aligner train` and `alignfast correct`: {question, answer, correction}.

Sources: a .jsonl/.json/.csv file, a `datasets` hub name (the public aligner/aligner-20K and
aligner/alignertails sets have these columns), or `toy:corrections` / `toy:corrections-eval` (the toy
world's target answers to its training / held-out prompts, with the right answers as corrections).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from alignfast.cli.data import FILE_SUFFIXES, _read_file, _read_hub, _int_setting
from alignfast.cli.errors import CLIError

TOY_SETS = {"toy:corrections": "train", "toy:corrections-eval": "eval"}


def load_rows(spec: dict, *, what: str, need_correction: bool = True) -> list[dict]:
    """Checked rows from `spec` = {path, name?, split?, limit?, shuffle_seed?}; errors name data.<what>."""
    from alignfast.aligner.data import check_rows
    from alignfast.ops import AlignfastArgumentError

    path = spec.get("path")
    if not path:
        raise CLIError(f"data.{what} needs a 'path' (a .jsonl/.json/.csv file, a datasets name or toy:corrections)")
    limit = _int_setting(spec, "limit", what, minimum=1)
    shuffle_seed = _int_setting(spec, "shuffle_seed", what, minimum=0)
    p = Path(str(path)).expanduser()
    if str(path) in TOY_SETS:
        from alignfast.toy.corrections import make_correction_data

        # Only the rows asked for are generated (the target answers each one).
        rows = make_correction_data(split=TOY_SETS[str(path)], limit=limit if shuffle_seed is None else None)
    elif p.suffix in FILE_SUFFIXES or p.exists():
        if not p.is_file():
            raise CLIError(f"data.{what}: file not found: {p}")
        rows = _read_file(p, what)
    else:
        rows = _read_hub(str(path), spec, what)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    if limit is not None:
        rows = rows[:limit]
    try:
        return check_rows(rows, name=f"data.{what}", need_correction=need_correction)
    except AlignfastArgumentError as err:
        # "argument 'data.train' row 3 has no 'correction' field" -> "data.train row 3 has no 'correction' field"
        raise CLIError(re.sub(r"^argument '([^']+)'", r"\1", str(err).removeprefix("alignfast: "))) from None
