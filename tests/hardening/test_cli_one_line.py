"""The CLI promises one line and exit code 2 for a user's mistake (issue 10 case 13): an unknown device, a
non-numeric reward weight, a reward function that raises, a target endpoint that fails for good (with how to
continue: --resume), resuming with another value head. Each runs `alignfast train` in-process on the toy world."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from alignfast.cli import main

TOY = str(Path(__file__).resolve().parents[2] / "configs" / "toy.yaml")
SMALL = ["--total_episodes", "16", "--per_device_train_batch_size", "8", "--num_mini_batches", "1",
         "--num_ppo_epochs", "1", "--response_length", "4", "--save_steps", "1", "--data.eval", "null"]


def raising_reward(prompts, completions, **kwargs):
    raise ZeroDivisionError("division by zero in my reward")


# A logged warning (e.g. the busy-machine thread notice, which depends on the load) is not part of the error.
_LOGGED_WARNING = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARNING ")


class _QuietServer(ThreadingHTTPServer):
    """A client that gives up mid-answer (the engine's deadline) is expected here: socketserver would print its
    traceback to stderr, which is the very stream these tests read."""

    def handle_error(self, request, client_address):
        pass


def one_line(capsys, code, expected_code=2) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading" not in line
           and "Writing" not in line and not _LOGGED_WARNING.match(line)]
    assert code == expected_code and len(err) == 1, (code, err)
    return err[0]


def test_settings_and_reward_functions(tmp_path, capsys):
    run = ["train", "--config", TOY, "--trainer.output_dir", str(tmp_path / "a"), *SMALL]
    line = one_line(capsys, main([*run, "--trainer.device", "tpu:9"]))
    assert line == "alignfast train: error: argument 'device' is not a device torch knows, got 'tpu:9' (e.g. 'cpu', " \
                   "'cuda', 'cuda:1')"
    line = one_line(capsys, main([*run, "--reward.weights", "[heavy]"]))
    assert "'reward_weights' entry 0 must be a finite number, got 'heavy'" in line
    line = one_line(capsys, main([*run, "--reward.functions", "[tests.hardening.test_cli_one_line:raising_reward]"]))
    assert "reward function 'raising_reward' raised ZeroDivisionError: division by zero in my reward" in line


def test_resume_with_another_value_head(tmp_path, capsys):
    run = ["train", "--config", TOY, "--trainer.output_dir", str(tmp_path / "b"), *SMALL]
    assert main([*run, "--max_steps", "1"]) == 0
    capsys.readouterr()
    line = one_line(capsys, main([*run, "--max_steps", "2", "--value_head", "shared", "--resume"]))
    assert "cannot resume from" in line and "checkpoint-1: it was written with value_head='separate' and this run " \
                                           "has value_head='shared'" in line


class FailingServer:
    """Lists its model (the preflight passes), then answers every completion with HTTP 503."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # lists the run file's target model, so the preflight check passes without a warning
                self._send(200, {"object": "list", "data": [{"id": "toy:target", "object": "model"}]})

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self._send(503, {"error": {"message": "server restarting"}})

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


def test_a_target_that_fails_for_good_says_how_to_continue(tmp_path, capsys):
    pytest.importorskip("openai")
    server = FailingServer()
    try:
        line = one_line(capsys, main(["train", "--config", TOY, "--trainer.output_dir", str(tmp_path / "c"), *SMALL,
                                      "--target.engine", "openai", "--target.base_url", server.base_url,
                                      "--target.retry_budget", "0.3", "--target.timeout", "5"]))
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    assert line.startswith("alignfast train: error: the target failed: OpenAIEngine (" + server.base_url)
    assert "InternalServerError" in line and "server restarting" in line and "retry budget of 0.3 s" in line
    assert "no checkpoint was written yet: rerun once the endpoint is back" in line


@pytest.mark.parametrize("command", [["train"], ["train", "--method", "proxy"], ["aligner", "train"]])
def test_an_empty_output_dir_is_refused_not_the_working_directory(tmp_path, capsys, monkeypatch, command):
    """`--trainer.output_dir "$OUT"` with OUT unset: Align-Pro and the Aligner wrote their checkpoints, metrics, final/
    and lock into the working directory (exit 0); Proxy-RLHF took the default instead. Each is now one line."""
    configs = Path(TOY).parent
    config = {"train": TOY, "proxy": str(configs / "proxy_toy.yaml"), "aligner": str(configs / "aligner_toy.yaml")}
    monkeypatch.chdir(tmp_path)
    key = "proxy" if "proxy" in command else command[0]
    line = one_line(capsys, main([*command, "--config", config[key], "--trainer.output_dir", ""]))
    assert "output_dir" in line and "must name a folder, got '' (an empty value would write the run into the " \
                                   "working directory" in line, line
    assert list(tmp_path.iterdir()) == []


def test_what_is_in_the_way_of_output_dir_is_said_in_words(tmp_path, capsys):
    """mkdir's 'File exists' named neither a file where the folder goes nor a dangling link; a folder where
    config.json goes was reported as the temporary file written for it (gone by then), after metrics.jsonl had
    been created."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "missing" / "x")
    (tmp_path / "run" / "config.json").mkdir(parents=True)
    base = ["train", "--config", TOY, *SMALL, "--trainer.output_dir"]
    for folder, says in (("afile", "cannot be written (it is a file, not a folder)"),
                         ("link", f"cannot be written (it is a symbolic link to {tmp_path / 'missing' / 'x'}, which "
                                  "does not exist)"),
                         ("run", "a folder is in the way of a file alignfast writes: "
                                 f"{tmp_path / 'run' / 'config.json'}")):
        line = one_line(capsys, main([*base, str(tmp_path / folder)]))
        assert says in line, line
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".alignfast.lock", "config.json"]
