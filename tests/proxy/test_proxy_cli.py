"""`alignfast train --method proxy` on configs/proxy_toy.yaml: it trains, writes its run under
<output_dir>/proxy, resumes, and a bad proxy setting is a one-line error naming it."""

from __future__ import annotations

import json
from pathlib import Path

from alignfast.cli import main

RUN = str(Path(__file__).resolve().parents[2] / "configs" / "proxy_toy.yaml")


def test_train_method_proxy_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", RUN, "--method", "proxy", "--trainer.output_dir", str(out),
            "--per_device_train_batch_size", "8", "--num_mini_batches", "1", "--save_steps", "1",
            "--target_max_new_tokens", "4"]
    assert main([*args, "--total_episodes", "8"]) == 0
    assert main([*args, "--total_episodes", "16", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "proxy" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (out / "proxy" / "final" / "proxy.safetensors").is_file()


def test_bad_proxy_setting_is_one_line(tmp_path, capsys):
    assert main(["train", "--config", RUN, "--method", "proxy", "--max_rejections_per_token", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_rejections_per_token" in err[0]
