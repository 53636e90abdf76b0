"""Every run file in configs/ parses, names only known keys, and validates as an AlignProConfig; its LoRA
section builds a peft config. (The GPU ones load models by hub name, which CI cannot download.)"""

from pathlib import Path

import pytest

from alignfast.cli import build
from alignfast.cli.config import load_run_config

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")
                 # Align-Pro run files only: Aligner SFT's are tested in tests/aligner/test_cli.py, Proxy-RLHF's
                 # (`--method proxy`, other trainer fields) in tests/proxy/test_proxy_cli.py
                 if not p.name.startswith(("aligner_", "proxy_")))


def test_there_are_example_configs():
    names = {p.name for p in CONFIGS}
    assert "toy.yaml" in names and len(names) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_config_validates(path):
    config = load_run_config(path, trainer_fields=build.trainer_fields())
    cfg = build.trainer_config(config)
    assert cfg.kl_coef > 0 and "{prompt}" in cfg.rewrite_template
    for section in ("prompter", "target", "reward", "data"):
        assert config.get(section), f"{path.name} has no '{section}' section"
    assert config["data"]["train"]["path"] and config["data"]["eval"]["path"]
    lora = config["prompter"].get("lora")
    if lora:
        pytest.importorskip("peft")
        assert build.lora_config(lora).r == lora["r"]


def test_toy_run_file_trains_as_the_demo_does():
    """configs/toy.yaml is the demo's world as a run file: the settings the demo tuned (alignfast.toy.DEMO_CONFIG,
    e.g. kl_coef 0.1, where 0.05 let a seed collapse) must not drift apart from it."""
    from alignfast.toy import DEMO_CONFIG, load_world

    config = load_run_config(CONFIGS[[p.name for p in CONFIGS].index("toy.yaml")], trainer_fields=build.trainer_fields())
    trainer = config["trainer"]
    differ = {k: (trainer[k], v) for k, v in DEMO_CONFIG.items() if k in trainer and trainer[k] != v}
    assert not differ, f"toy.yaml vs DEMO_CONFIG: {differ}"
    world = load_world()
    assert trainer["rewrite_template"] == world.rewrite_template
    assert trainer["target_prompt_template"] == world.target_prompt_template
