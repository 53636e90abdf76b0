"""YAML with the YAML 1.2 core schema's scalars, for run files and command-line overrides.

PyYAML implements YAML 1.1, whose implicit types surprise users of a modern config file:
    `save_strategy: no`   -> False          (1.1 booleans: yes/no/on/off/y/n)
    `learning_rate: 3e-4` -> the string '3e-4'  (1.1 floats need a dot: 3.0e-4)
    `seed: 010`           -> 8               (1.1 octal)
The 1.2 core schema (what YAML 1.2 parsers and JSON agree on) fixes all three: booleans are true/false
only, 3e-4 and 1e-6 are floats, 010 is ten. Everything else (mappings, lists, quoting, null) is unchanged.
"""

from __future__ import annotations

import math
import re

import yaml

_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


class Loader(yaml.SafeLoader):
    """SafeLoader with the 1.2 core schema's bool, int and float resolution."""


# Drop the 1.1 resolvers of these three tags, keep the others (null, timestamps, merge keys, ...).
_REPLACED = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789"))


def _bool(loader, node):
    return loader.construct_scalar(node).lower() == "true"


def _int(loader, node):
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text, 0)
    return int(text, 10)  # 010 is ten, as in 1.2 (1.1 read it as octal 8)


def _float(loader, node):
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    return float(text)


Loader.add_constructor("tag:yaml.org,2002:bool", _bool)
Loader.add_constructor("tag:yaml.org,2002:int", _int)
Loader.add_constructor("tag:yaml.org,2002:float", _float)


def load(text: str):
    """Parse one YAML document with the 1.2 core schema's scalars."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader subclass
