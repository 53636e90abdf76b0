"""The run file of `alignfast train` / `alignfast eval`: which models, which data, which trainer settings.

A YAML file with five sections; every key is checked, so a typo is an error, not a silently ignored
setting:

    prompter: {model: <hub name or path>, dtype: bfloat16, lora: {r: 16, ...} | null}
    target:   {model: <hub name or path>, engine: hf | vllm | openai, dtype, ...; for openai: base_url,
               api: chat | completions (default: chat, completions when trainer.target_use_chat_template is
               false), api_key_env (default OPENAI_API_KEY), max_concurrency, timeout,
               retry_budget (seconds of retrying per request, default 30), call_timeout, ...}
    reward:   {model: <sequence-classification RM> | null, functions: ["pkg.module:function", ...], weights: [...]}
    data:     {train: {path, split, prompt_column, limit, ...}, eval: {...}}
    trainer:  {<AlignProConfig fields>}

Overrides on the command line use dotted keys, `--trainer.kl_coef 0.1` or `--target.model ./llama`; a bare
key that names a trainer field (`--kl_coef 0.1`) means `trainer.<key>`. Values are parsed as YAML scalars
(`true`, `3`, `1e-5`, `null`, `[a, b]`). The file and the overrides are read with YAML 1.2's scalars
(alignfast.cli.yaml12): `1e-6` is a number and `save_strategy: no` the string 'no', not False.

Relative paths written IN THE FILE (data.*.path, and the model/tokenizer of each model section) are taken
from the run file's folder when that folder holds them, else from the working directory, the same order
in which reward.functions' own modules are found; paths given as command-line overrides are the shell's,
taken from the working directory.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from alignfast.cli import yaml12
from alignfast.cli.errors import CLIError

SECTIONS: dict[str, set[str] | None] = {
    "prompter": {"model", "tokenizer", "dtype", "lora", "trust_remote_code", "revision"},
    "target": {"model", "tokenizer", "engine", "dtype", "max_batch_tokens", "attn_implementation",   # hf
               "gpu_memory_utilization", "tensor_parallel_size", "max_model_len",                     # vllm
               "base_url", "api", "api_key_env", "max_concurrency", "timeout", "max_retries",         # openai
               "retry_budget", "call_timeout",
               "system_prompt", "trust_remote_code", "revision", "lora"},
    "aligner": {"model", "tokenizer", "dtype", "lora", "trust_remote_code", "revision"},  # `alignfast aligner`
    "reward": {"model", "tokenizer", "dtype", "functions", "weights", "label_index", "trust_remote_code", "revision"},
    "data": {"train", "eval"},
    "trainer": None,  # checked against AlignProConfig's fields by the trainer itself
}
# Keys a user may reasonably look for in a section where they are not: the error says where the setting is.
ELSEWHERE = {"reward.template": "the reward model's input template is trainer.reward_template (used when its "
                                "tokenizer has no chat template)"}
DATA_KEYS = {"path", "name", "split", "prompt_column", "limit", "shuffle_seed", "columns"}


def load_run_config(path: str | Path | None, overrides: Sequence[str] = (), *,
                    trainer_fields: Iterable[str] = ()) -> dict:
    """Read the YAML run file (or start empty), apply `--key value` overrides, check every key."""
    config: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise CLIError(f"config file not found: {p}")
        try:
            loaded = yaml12.load(p.read_text())
        except (OSError, UnicodeDecodeError) as err:
            raise CLIError(f"config file {p} cannot be read: {err}") from None
        except yaml.YAMLError as err:
            raise CLIError(f"config file {p} is not valid YAML: {str(err).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise CLIError(f"config file {p} must hold a mapping of sections, got {type(loaded).__name__}")
        config = copy.deepcopy(loaded)
    _normalise_data_paths(config)
    if path is not None:
        _resolve_from_run_file(config, Path(path).expanduser().resolve().parent)
    apply_overrides(config, overrides, trainer_fields=set(trainer_fields))
    check_keys(config)
    return config


def _normalise_data_paths(config: dict) -> None:
    """`data: {train: file.jsonl}` means `{train: {path: file.jsonl}}`, so `--data.train.limit` can apply."""
    data = config.get("data")
    if isinstance(data, dict):
        for split in ("train", "eval"):
            if isinstance(data.get(split), str):
                data[split] = {"path": data[split]}


MODEL_SECTIONS = ("prompter", "target", "aligner", "reward")


def _resolve_from_run_file(config: dict, run_dir: Path) -> None:
    """A relative path in the file that exists beside the file becomes that absolute path.

    Only paths that exist there are rewritten: anything else (a hub name such as 'org/model', a datasets
    name, toy:..., a file that lives in the working directory) is left for the loaders to resolve as before,
    so run files written for the working directory keep working."""

    def beside_run_file(value):
        if not isinstance(value, str) or not value or ":" in value:
            return value
        p = Path(value).expanduser()
        if p.is_absolute():
            return value
        candidate = run_dir / p
        return str(candidate) if candidate.exists() else value

    for split in ("train", "eval"):
        spec = (config.get("data") or {}).get(split)
        if isinstance(spec, dict) and "path" in spec:
            spec["path"] = beside_run_file(spec["path"])
    for name in MODEL_SECTIONS:
        sec = config.get(name)
        if isinstance(sec, dict) and not (name == "target" and sec.get("engine") == "openai"):
            # (an openai target's model is the name the server knows it by, never a local path)
            for key in ("model", "tokenizer"):
                if key in sec:
                    sec[key] = beside_run_file(sec[key])


def parse_overrides(tokens: Sequence[str]) -> list[tuple[str, object]]:
    """['--a.b', '1', '--c=x'] -> [('a.b', 1), ('c', 'x')], values parsed as YAML scalars."""
    pairs, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise CLIError(f"unexpected argument {tok!r}: overrides look like --section.key value")
        key = tok[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise CLIError(f"override --{key} has no value")
            raw = tokens[i + 1]
            i += 2
        try:
            value = yaml12.load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key.replace("-", "_"), value))
    return pairs


def apply_overrides(config: dict, overrides: Sequence[str], *, trainer_fields: set[str]) -> None:
    for key, value in parse_overrides(list(overrides)):
        parts = key.split(".")
        if parts[0] not in SECTIONS:
            if len(parts) == 1 and parts[0] in trainer_fields:
                parts = ["trainer", parts[0]]
            else:
                raise CLIError(f"unknown setting --{key}: use --<section>.<key> with a section in {list(SECTIONS)}"
                               + (" or a trainer field" if trainer_fields else ""))
        node = config
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if isinstance(child, str) and node is config.get("data") and part in ("train", "eval"):
                # data.<split> given as a path (in the file or by an earlier --data.<split> PATH): its settings
                # go beside the path, as with {path: ..., limit: ...}
                child = node[part] = {"path": child}
            if not isinstance(child, dict):
                raise CLIError(f"cannot set --{key}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value


def check_keys(config: dict) -> None:
    for section, value in config.items():
        if section not in SECTIONS:
            raise CLIError(f"unknown config section '{section}' (sections: {', '.join(SECTIONS)})")
        if value is None:
            continue
        if not isinstance(value, dict):
            raise CLIError(f"config section '{section}' must be a mapping, got {type(value).__name__}")
        allowed = SECTIONS[section]
        if allowed is not None:
            unknown = sorted(set(value) - allowed)
            if unknown:
                key = f"{section}.{unknown[0]}"
                if key in ELSEWHERE:
                    raise CLIError(f"unknown key '{key}': {ELSEWHERE[key]}")
                raise CLIError(f"unknown key '{key}' (allowed: {', '.join(sorted(allowed))})")
    for split in ("train", "eval"):
        spec = (config.get("data") or {}).get(split)
        if spec is None:
            continue
        if isinstance(spec, str):
            config["data"][split] = spec = {"path": spec}
        if not isinstance(spec, dict):
            raise CLIError(f"data.{split} must be a path or a mapping, got {type(spec).__name__}")
        unknown = sorted(set(spec) - DATA_KEYS)
        if unknown:
            raise CLIError(f"unknown key 'data.{split}.{unknown[0]}' (allowed: {', '.join(sorted(DATA_KEYS))})")
    if "target_system_prompt" in (config.get("trainer") or {}):  # one place in a run file, for every engine
        raise CLIError("key 'trainer.target_system_prompt': a run file sets the target's system message as "
                       "target.system_prompt (every target engine, and the Oracle arm)")


def section(config: dict, name: str) -> dict:
    return dict(config.get(name) or {})


def require(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            raise CLIError(f"the config needs '{dotted}' (set it in the file or with --{dotted} ...)")
        node = node[part]
    return node
