"""Rebuilding the world from its seeds gives a world with the shipped world's properties (slow: the
full supervised recipe, about 10-20 minutes on 2 CPU cores)."""

import json

import pytest

from alignfast.toy.build import build
from alignfast.toy.world import load_world


@pytest.mark.slow
def test_rebuild_from_seeds_reproduces_the_world(tmp_path):
    record = build(tmp_path, log=lambda *_: None)
    checks = record["checks"]
    assert checks["target_exact_explicit"] >= 0.95
    assert checks["target_exact_terse"] <= 0.6
    kinds = checks["sft_rewrite_kinds"]
    assert 0.45 <= kinds["copy"] <= 0.8 and kinds["intended"] >= 0.05 and kinds["other"] <= 0.1
    assert json.loads((tmp_path / "build.json").read_text())["checks"] == checks
    world = load_world(tmp_path)
    assert world.prompter_path == str(tmp_path / "prompter")
