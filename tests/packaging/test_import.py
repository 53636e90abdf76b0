"""`import alignfast` is cheap and safe: no CUDA initialisation, no Triton or transformers import,
no failure without the extension; `python -m alignfast.info` tells which implementation runs where."""

import json
import os
import subprocess
import sys

import pytest


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_import_is_lean():
    probe = _run(
        "import sys, json; import alignfast; import alignfast.ops; import alignfast.reference;"
        "import torch;"
        "print(json.dumps({'triton': 'triton' in sys.modules, 'transformers': 'transformers' in sys.modules,"
        " 'cuda_init': torch.cuda.is_initialized()}))"
    )
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen == {"triton": False, "transformers": False, "cuda_init": False}, seen


def test_top_level_names_resolve_lazily():
    import alignfast

    assert alignfast.__version__
    for name in alignfast.__all__:
        if name in ("trainer", "AlignProConfig", "AlignProTrainer", "OracleTrainer", "cli"):
            continue  # exercised by their own tests; they import transformers
        assert getattr(alignfast, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        alignfast.nope  # noqa: B018


def test_info_lists_every_public_op():
    from alignfast.ops import _library

    out = subprocess.run([sys.executable, "-m", "alignfast.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "extension alignfast._C:" in out.stdout
    public = [name for name, info in _library.OPS.items() if info.public]
    for name in public:
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith(name + " ")), None)
        assert line is not None, f"{name} missing from:\n{out.stdout}"
        assert "(" in line  # every cell says why


def test_info_without_extension_says_why():
    out = subprocess.run([sys.executable, "-m", "alignfast.info"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ALIGNFAST_DISABLE_EXT": "1"})
    assert out.returncode == 0, out.stderr
    assert "not loaded: disabled by ALIGNFAST_DISABLE_EXT=1" in out.stdout


def test_every_extra_the_messages_name_exists():
    """Error messages tell users to `pip install 'alignfast[<extra>]'`: each such extra is declared (pip only
    warns about an unknown extra and installs nothing)."""
    import re
    from pathlib import Path

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[2]
    extras = set(tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = set()
    for path in [*(root / "alignfast").rglob("*.py"), root / "README.md", *(root / "configs").glob("*.yaml")]:
        named |= set(re.findall(r"alignfast\[([a-z0-9_-]+)\]", path.read_text()))
    assert named and named <= extras, f"named but not declared: {sorted(named - extras)}"
