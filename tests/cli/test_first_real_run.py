"""What a first run on a real model hit (issue 14), on the toy world: log lines off a terminal, reward modules
beside the run file, an occupied output_dir refused before any model loads, the SFT prompter arm of eval."""

import io
import json
import logging
import sys
from pathlib import Path

import pytest

from alignfast.cli import main
from alignfast.cli.errors import CLIError
from alignfast.cli.logs import command_logging
from alignfast.cli.models import import_callable

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "configs" / "toy.yaml"

REWARDS = '''
def score(prompts, completions, **columns):
    """1 for an answer that is not empty."""
    return [float(bool(c.strip())) for c in completions]
'''


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_lines_only_off_a_terminal(monkeypatch):
    trainer_log = logging.getLogger("alignfast.trainer")
    off = io.StringIO()
    monkeypatch.setattr(sys, "stderr", off)
    with command_logging():
        trainer_log.info("step 1/2  scores 0.5000")
        trainer_log.warning("a warning")
    trainer_log.info("after the command")  # the handler is gone with the command
    lines = off.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith("INFO alignfast.trainer: step 1/2  scores 0.5000"), lines
    assert "WARNING" in lines[1]

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with command_logging():
        trainer_log.info("step 1/2  scores 0.5000")  # the progress bar shows the steps on a terminal
        trainer_log.warning("a warning")
    assert term.getvalue().splitlines()[-1].endswith("WARNING alignfast.trainer: a warning")
    assert "step 1/2" not in term.getvalue()


def _run_file(folder: Path, functions: list[str]) -> Path:
    """The toy run file copied into `folder` with its own reward.functions."""
    import yaml

    config = yaml.safe_load(TOY.read_text())
    config["reward"]["functions"] = functions
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_off_a_terminal_with_a_reward_module_beside_the_run_file(tmp_path, monkeypatch, capsys):
    """The console script puts neither the run file's folder nor the working directory on sys.path: the
    module beside the run file must still be found, and stderr (captured: not a terminal) gets a line a step."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    runs = tmp_path / "project"
    (runs / "my_rewards_e2e.py").parent.mkdir(parents=True)
    (runs / "my_rewards_e2e.py").write_text(REWARDS)
    config = _run_file(runs, ["my_rewards_e2e:score"])
    monkeypatch.chdir(tmp_path)  # elsewhere: found through the run file's folder
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--trainer.output_dir", str(out), "--total_episodes", "8",
                 "--per_device_train_batch_size", "4", "--num_mini_batches", "1", "--num_ppo_epochs", "1",
                 "--logging_steps", "1"]) == 0
    err = capsys.readouterr().err
    steps = [line for line in err.splitlines() if "INFO alignfast.trainer: step " in line]
    assert [s.split("step ")[1].split()[0] for s in steps] == ["1/2", "2/2"], err
    assert "scores" in steps[0] and "kl" in steps[0]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(0.0 <= m["rewards/score"] <= 1.0 for m in metrics)  # the module's reward


def test_reward_module_and_file_forms(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    beside, cwd = tmp_path / "runs", tmp_path / "work"
    (beside / "pkg").mkdir(parents=True)
    cwd.mkdir()
    (beside / "rewards_beside.py").write_text(REWARDS)
    (beside / "pkg" / "rewards_file.py").write_text(REWARDS.replace("score", "judge"))
    (cwd / "rewards_cwd.py").write_text(REWARDS)
    monkeypatch.chdir(cwd)
    dirs = [str(beside), str(cwd)]
    assert import_callable("rewards_beside:score", "reward function", search_dirs=dirs)(["p"], ["a"]) == [1.0]
    assert import_callable("rewards_cwd:score", "reward function", search_dirs=dirs)(["p"], [" "]) == [0.0]
    judge = import_callable("pkg/rewards_file.py:judge", "reward function", search_dirs=dirs)  # from the run file's folder
    assert judge(["p"], ["a"]) == [1.0]
    assert import_callable(str(beside / "pkg" / "rewards_file.py") + ":judge", "reward function") is judge  # once
    assert sys.path[-2:] == dirs  # after sys.path: a local file never shadows an installed package

    with pytest.raises(CLIError, match=r"cannot import no_such_rewards: .*looked in .*runs.*'path/to/no_such_rewards.py:score'"):
        import_callable("no_such_rewards:score", "reward function", search_dirs=dirs)
    with pytest.raises(CLIError, match=r"'missing.py:score': file not found \(looked for .*runs/missing.py, .*work/missing.py"):
        import_callable("missing.py:score", "reward function", search_dirs=dirs)
    with pytest.raises(CLIError, match="has no callable 'nope'"):
        import_callable("pkg/rewards_file.py:nope", "reward function", search_dirs=dirs)


def test_occupied_output_dir_fails_before_any_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    # A prompter that cannot load: had the models loaded first, this would be the error.
    argv = ["train", "--config", str(TOY), "--trainer.output_dir", str(out), "--prompter.model", "no-org/no-model"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Killed before its first checkpoint: nothing to resume, so the way out is overwrite_output_dir, not --resume.
    assert len(err) == 1 and "a run with no checkpoint (metrics.jsonl)" in err[0] and \
        "--trainer.overwrite_output_dir true" in err[0] and "--resume" not in err[0], err
    assert main([*argv, "--resume"]) == 2  # resuming is allowed past the check (and then fails on the model)
    assert "cannot load the prompter" in capsys.readouterr().err


def test_a_reward_file_given_on_the_command_line_is_the_working_directorys(tmp_path, monkeypatch):
    """Paths given as overrides are the shell's: with reward.functions on the command line, a same-named file in
    the working directory wins over the one beside the run file (which the run file's own entry would find)."""
    from alignfast.cli import build

    run = _run_file(tmp_path / "runs", ["alignfast.toy:answer_accuracy"])
    monkeypatch.chdir(tmp_path)
    cwd, beside = str(tmp_path.resolve()), str((tmp_path / "runs").resolve())
    assert build.run_file_dirs(run) == [beside, cwd]
    assert build.run_file_dirs(run, ["--reward.functions", "[dup.py:score]"]) == [cwd, beside]
    assert build.run_file_dirs(run, ["--kl_coef", "0.1"]) == [beside, cwd]
