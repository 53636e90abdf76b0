"""Prompt sets for training and evaluation: JSONL, JSON, CSV files, or a `datasets` hub name.

Each record becomes a dict with "prompt" (from `prompt_column`) and every other column kept, since
reward functions receive the extra columns (`f(prompts, completions, **columns)`).
"""

from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path

from alignfast.cli.errors import CLIError

FILE_SUFFIXES = (".jsonl", ".json", ".csv")
TOY_SETS = ("toy:train", "toy:eval")  # the embedded world's training and held-out prompts (alignfast.toy)
_log = logging.getLogger("alignfast.cli")


def _toy_rows(name: str) -> list[dict]:
    from alignfast.toy import load_world

    world = load_world()
    return [dict(r) for r in (world.train_prompts if name == "toy:train" else world.eval_prompts)]


def load_prompts(spec: dict, *, what: str) -> list[dict]:
    """Records from `spec` = {path, name?, split?, prompt_column='prompt', limit?, shuffle_seed?, columns?}."""
    path = spec.get("path")
    if not path:
        raise CLIError(f"data.{what} needs a 'path' (a .jsonl/.json/.csv file or a datasets name)")
    column = spec.get("prompt_column") or "prompt"
    limit = _int_setting(spec, "limit", what, minimum=1)
    shuffle_seed = _int_setting(spec, "shuffle_seed", what, minimum=0)
    p = Path(str(path)).expanduser()
    if str(path).startswith("toy:") and str(path) not in TOY_SETS:  # not a file name: say which toy sets exist
        raise CLIError(f"data.{what}: unknown toy data set '{path}' (use {' or '.join(TOY_SETS)})")
    if str(path) in TOY_SETS:
        refuse_hub_keys(spec, what, str(path))
        rows = _toy_rows(str(path))
        source = str(path)
    # a folder (a dataset repository cloned for offline use) goes to `datasets`, as a hub name does
    elif p.suffix in FILE_SUFFIXES or p.is_file():
        if not p.is_file():
            raise CLIError(f"data.{what}: file not found: {p}")
        refuse_hub_keys(spec, what, str(p))
        rows = _read_file(p, what)
        source = str(p)
    else:
        rows = _read_hub(str(path), spec, what)
        source = f"datasets:{path}"
    if not rows:
        raise CLIError(f"data.{what}: {source} holds no records")
    if column not in rows[0]:
        raise CLIError(f"data.{what}: {source} has no column '{column}' (columns: {', '.join(map(str, rows[0]))}); "
                       f"set data.{what}.prompt_column")
    _check_same_columns(rows, source, what)
    keep = spec.get("columns")
    if keep is not None:
        if isinstance(keep, str) or not isinstance(keep, list):
            raise CLIError(f"data.{what}.columns must be a list of column names, got {keep!r}")
        absent = [k for k in keep if k not in rows[0]]
        if absent:  # a typo here would silently starve the reward functions of that column
            raise CLIError(f"data.{what}.columns names '{absent[0]}', which {source} does not have (columns: "
                           f"{', '.join(map(str, rows[0]))})")
    if column != "prompt" and "prompt" in rows[0] and (keep is None or "prompt" in keep):
        _log.warning("data.%s: %s has its own 'prompt' column, which the reward functions will not see: "
                     "data.%s.prompt_column '%s' fills 'prompt'", what, source, what, column)
    records = []
    for i, row in enumerate(rows):
        prompt = row.get(column)
        if not isinstance(prompt, str) or not prompt.strip():
            raise CLIError(f"data.{what}: record {i} of {source} has no text in column '{column}'")
        extra = {k: v for k, v in row.items() if k != column and (keep is None or k in keep)}
        records.append({**extra, "prompt": prompt})  # prompt_column wins over a column named 'prompt'
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)
    if limit is not None:
        records = records[:limit]
    return records


def refuse_hub_keys(spec: dict, what: str, source: str) -> None:
    """`split` and `name` are arguments of datasets.load_dataset (a hub name or a folder); a local file or a toy set
    is read whole, and either key there was silently ignored (data.train.split 'train[:1]' trained on every row)."""
    for key in ("split", "name"):
        if spec.get(key) is not None:
            raise CLIError(f"data.{what}.{key} ({spec[key]!r}) applies to a datasets name or folder only, and {source} "
                           f"is read whole: remove it (--data.{what}.{key} null; data.{what}.limit keeps the first "
                           "rows)")


def _int_setting(spec: dict, key: str, what: str, *, minimum: int) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CLIError(f"data.{what}.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _read_file(p: Path, what: str) -> list[dict]:
    try:
        if p.suffix == ".csv":
            # utf-8-sig: a byte-order mark (Excel's UTF-8 CSV) is not part of the first column's name
            with open(p, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                rows = []
                for row in reader:  # DictReader pads a short row with None and files a long one's extras under None
                    if None in row or any(v is None for v in row.values()):
                        side = "more" if None in row else "fewer"
                        raise CLIError(f"data.{what}: {p} line {reader.line_num} has {side} fields than its header "
                                       f"({len(reader.fieldnames or [])}: {', '.join(reader.fieldnames or [])})")
                    rows.append(row)
            return rows
        if p.suffix == ".json":
            try:
                data = json.loads(p.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as err:
                raise CLIError(f"data.{what}: {p} is not JSON ({err.msg} at line {err.lineno})") from None
            if isinstance(data, dict):  # {"data": [...]} or {column: [values]}
                data = data.get("data", data)
            if isinstance(data, dict):
                data = _columns_to_rows(data, p, what)
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise CLIError(f"data.{what}: {p} must hold a list of objects")
            return data
        rows = []
        with open(p, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise CLIError(f"data.{what}: {p} line {n} is not JSON ({err.msg})") from None
                    if not isinstance(row, dict):
                        raise CLIError(f"data.{what}: {p} line {n} is not a JSON object")
                    rows.append(row)
        return rows
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"data.{what}: cannot read {p}: {err}") from None


def _columns_to_rows(data: dict, p: Path, what: str) -> list[dict]:
    """{column: [values]} -> [{column: value}]; columns of different lengths are an error (zip would
    silently train on the shortest)."""
    lengths = {}
    for k, v in data.items():
        if not isinstance(v, list):
            raise CLIError(f"data.{what}: {p} must hold a list of objects or {{column: [values]}}; column '{k}' "
                           f"is a {type(v).__name__}, not a list")
        lengths[k] = len(v)
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"'{k}': {n}" for k, n in lengths.items())
        raise CLIError(f"data.{what}: {p} has columns of different lengths ({shown})")
    keys = list(data)
    return [dict(zip(keys, values)) for values in zip(*data.values())]


def _check_same_columns(rows: list[dict], source: str, what: str) -> None:
    """Every record has the columns the first one has: a missing one would reach the reward as None."""
    first = set(rows[0])
    for i, row in enumerate(rows[1:], 1):
        keys = set(row)
        if keys != first:
            missing, extra = sorted(first - keys), sorted(keys - first)
            detail = (f"lacks column '{missing[0]}'" if missing else f"has column '{extra[0]}'")
            raise CLIError(f"data.{what}: record {i} of {source} {detail} that record 0 "
                           f"{'has' if missing else 'lacks'} (every record needs the same columns; use null for "
                           "a missing value)")


def _read_hub(name: str, spec: dict, what: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise CLIError(f"data.{what}: '{name}' is not a local file, and reading hub datasets needs the "
                       "`datasets` package (pip install 'alignfast[data]')") from None
    saved = Path(name).expanduser()
    if (saved / "state.json").is_file() and (saved / "dataset_info.json").is_file():
        return _read_saved_dataset(datasets, saved, spec, what)
    try:
        ds = datasets.load_dataset(name, spec.get("name"), split=spec.get("split") or "train")
    except Exception as err:  # noqa: BLE001 - the datasets library raises many types; one line for the user
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CLIError(f"data.{what}: cannot load dataset '{name}' ({first}); offline, point data.{what}.path "
                       "at a local .jsonl/.csv file") from None
    return _rows_of(ds, spec)


def _rows_of(ds, spec: dict) -> list[dict]:
    limit = spec.get("limit")  # checked by load_prompts
    if limit is not None and spec.get("shuffle_seed") is None:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(r) for r in ds]


def _read_saved_dataset(datasets, folder: Path, spec: dict, what: str) -> list[dict]:
    """A folder written by Dataset.save_to_disk (load_dataset refuses it; a saved DatasetDict's dataset_dict.json
    makes load_dataset read it with its splits): one table, so split and name do not apply."""
    for key in ("split", "name"):
        if spec.get(key) is not None:
            raise CLIError(f"data.{what}.{key} ({spec[key]!r}) does not apply: {folder} is one Dataset saved with "
                           f"save_to_disk, which has no splits or configurations: remove it (--data.{what}.{key} null)")
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as err:  # noqa: BLE001 - one line for the user
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CLIError(f"data.{what}: cannot load the saved dataset {folder} ({first})") from None
    return _rows_of(ds, spec)
