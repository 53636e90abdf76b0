"""Correction rows for `alignfast aligner train` and `alignfast correct`: {question, answer, correction}.

Sources: a .jsonl/.json/.csv file, a `datasets` hub name (the public aligner/aligner-20K and
aligner/alignertails sets have these columns), or `toy:corrections` / `toy:corrections-eval` (the toy
world's target answers to its training / held-out prompts, with the right answers as corrections).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from alignfast.cli.data import FILE_SUFFIXES, _int_setting, _read_file, _read_hub, refuse_hub_keys
from alignfast.cli.errors import CLIError

TOY_SETS = {"toy:corrections": "train", "toy:corrections-eval": "eval"}


def column_names(spec: dict, *, what: str) -> dict[str, str]:
    """{the source's column: the field it fills} from data.<what>.columns = {question: ..., answer: ...,
    correction: ...} (any subset) and prompt_column (the question's column, as for Align-Pro's prompts): for a set
    whose columns are named otherwise, e.g. {question: query, answer: response, correction: revision}."""
    from alignfast.aligner.data import FIELDS

    mapping = spec.get("columns")
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict) or any(k not in FIELDS or not isinstance(v, str) for k, v in mapping.items()):
        raise CLIError(f"data.{what}.columns must map the Aligner's fields ({', '.join(FIELDS)}) to the names of "
                       f"your columns, e.g. {{question: query, answer: response}}; got {mapping!r}")
    mapping = dict(mapping)
    question = spec.get("prompt_column")
    if question is not None:
        question = str(question)
    if question is not None:
        if mapping.get("question", question) != question:
            raise CLIError(f"data.{what}.prompt_column ({question!r}) and data.{what}.columns.question "
                           f"({mapping['question']!r}) name different columns; give one")
        mapping["question"] = question
    sources = list(mapping.values())
    shared = next((s for s in sources if sources.count(s) > 1), None)
    if shared is not None:
        raise CLIError(f"data.{what}.columns maps two fields to the column '{shared}'; each field needs its own")
    return {source: field for field, source in mapping.items()}


def load_rows(spec: dict, *, what: str, need_correction: bool = True) -> list[dict]:
    """Checked rows from `spec` = {path, name?, split?, limit?, shuffle_seed?, columns?, prompt_column?}; errors
    name data.<what>."""
    from alignfast.aligner.data import check_rows
    from alignfast.ops import AlignfastArgumentError

    path = spec.get("path")
    if not path:
        raise CLIError(f"data.{what} needs a 'path' (a .jsonl/.json/.csv file, a datasets name or toy:corrections)")
    limit = _int_setting(spec, "limit", what, minimum=1)
    shuffle_seed = _int_setting(spec, "shuffle_seed", what, minimum=0)
    rename = column_names(spec, what=what)
    p = Path(str(path)).expanduser()
    if str(path).startswith("toy:") and str(path) not in TOY_SETS:  # not a file name: say which toy sets exist
        raise CLIError(f"data.{what}: unknown toy data set '{path}' (use {' or '.join(TOY_SETS)})")
    if str(path) in TOY_SETS:
        from alignfast.toy.corrections import make_correction_data

        refuse_hub_keys(spec, what, str(path))

        # Only the rows asked for are generated (the target answers each one).
        rows = make_correction_data(split=TOY_SETS[str(path)], limit=limit if shuffle_seed is None else None)
    # a folder (a dataset repository cloned for offline use) goes to `datasets`, as a hub name does
    elif p.suffix in FILE_SUFFIXES or p.is_file():
        if not p.is_file():
            raise CLIError(f"data.{what}: file not found: {p}")
        refuse_hub_keys(spec, what, str(p))
        rows = _read_file(p, what)
    else:
        rows = _read_hub(str(path), spec, what)
    if rename:
        for i, row in enumerate(rows):
            absent = [source for source in rename if source not in row]
            if absent:  # a typo would otherwise surface as "row 0 has no 'question' field", far from its cause
                raise CLIError(f"data.{what}.columns names '{absent[0]}', which row {i} of {path} does not have "
                               f"(its columns: {', '.join(map(str, row))})")
        # the named columns fill their fields; a column already called by a mapped field's name gives way
        rows = [{**{k: v for k, v in row.items() if k not in rename and k not in rename.values()},
                 **{field: row[source] for source, field in rename.items()}} for row in rows]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    if limit is not None:
        rows = rows[:limit]
    try:
        return check_rows(rows, name=f"data.{what}", need_correction=need_correction)
    except AlignfastArgumentError as err:
        # "argument 'data.train' row 3 has no 'correction' field" -> "data.train row 3 has no 'correction' field"
        raise CLIError(re.sub(r"^argument '([^']+)'", r"\1", str(err).removeprefix("alignfast: "))) from None
