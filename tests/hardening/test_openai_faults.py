"""OpenAIEngine against misbehaving OpenAI-compatible servers on 127.0.0.1 (issue 10 cases 6, 7, 14; issue 14
items 4 and 7): every wait is bounded, Retry-After is honoured within the retry budget, malformed answers are
quoted, a closed engine says so, the endpoint is checked before a run, and usage counts the target's tokens.

Each test's server misbehaves by its path's prompt (see FaultServer.answer); every test is bounded by a few
seconds of wall time."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from alignfast.rollout import EngineRequestError, OpenAIEngine  # noqa: E402


# prompt -> the choices a broken server returns for n samples (each must be a malformed response)
BAD_CHOICES = {
    "no-text": lambda n: [{"index": i, "finish_reason": "stop"} for i in range(n)],
    "int-text": lambda n: [{"index": i, "text": 42, "finish_reason": "stop"} for i in range(n)],
    "null-index": lambda n: [{"index": None, "text": f"t{i}", "finish_reason": "stop"} for i in range(n)],
    "str-index": lambda n: [{"index": str(i), "text": f"t{i}", "finish_reason": "stop"} for i in reversed(range(n))],
    "dup-index": lambda n: [{"index": 0, "text": f"t{i}", "finish_reason": "stop"} for i in range(n)],
    "message-str": lambda n: [{"index": i, "message": "hello", "finish_reason": "stop"} for i in range(n)],
    "message-int": lambda n: [{"index": i, "message": {"role": "assistant", "content": 7}} for i in range(n)],
}


def _completion(prompt: str, n: int, tokens: int = 3) -> dict:
    return {"id": "x", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": i, "text": f"{prompt}|{i}", "finish_reason": "stop", "logprobs": None}
                        for i in range(n)],
            "usage": {"prompt_tokens": 1, "completion_tokens": tokens * n, "total_tokens": 1 + tokens * n}}


class FaultServer:
    """prompt -> behaviour:
        trickle          headers, then one byte of a long body every 0.2 s (for minutes)
        trickle-headers  the status line and headers one byte every 0.2 s
        silent           accepts, never answers
        retry-after<s>   429 with Retry-After: <s> for the first request, then an answer
        always-429       429 with Retry-After: 1 always
        always-503-ra0   503 with Retry-After: 0 always
        always-429-ms0   429 with retry-after-ms: 0 always
        html             200 with an HTML page
        error-200        200 carrying {"error": ...}
        no-choices       200 with a JSON object without choices
        base-model       a chat request: 400 naming the chat template (a base model); a completion: answered
        BAD_CHOICES key  200 with those choices (the chat API's last user message is the prompt)
        anything else    a normal completion (usage: 3 tokens per choice)"""

    def __init__(self):
        self.times: dict[str, list[float]] = {}
        self.models = ["m"]
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.rstrip("/").endswith("/v1/models"):
                    self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                                  "owned_by": "me"} for m in server.models]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"] if "messages" in body else body.get("prompt")
                server.times.setdefault(prompt, []).append(time.monotonic())
                try:
                    self._answer(prompt, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, status, payload, headers=(), raw: bytes | None = None, ctype="application/json"):
                data = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _answer(self, prompt, body):
                n = body.get("n", 1)
                if prompt == "trickle":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    for _ in range(300):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.2)
                elif prompt == "trickle-headers":
                    for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"a" * 300:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.2)
                elif prompt == "silent":
                    time.sleep(60)
                elif prompt.startswith("retry-after"):
                    if len(server.times[prompt]) == 1:
                        self._send(429, {"error": {"message": "slow down"}}, headers=[("Retry-After", prompt[11:])])
                    else:
                        self._send(200, _completion(prompt, n))
                elif prompt == "always-429":
                    self._send(429, {"error": {"message": "slow down"}}, headers=[("Retry-After", "1")])
                elif prompt == "always-503-ra0":
                    self._send(503, {"error": {"message": "overloaded"}}, headers=[("Retry-After", "0")])
                elif prompt == "always-429-ms0":
                    self._send(429, {"error": {"message": "slow down"}}, headers=[("retry-after-ms", "0")])
                elif prompt == "base-model" and "messages" in body:  # vLLM serving a model without a chat template
                    self._send(400, {"error": {"message": "As of transformers v4.44, default chat template is no "
                                               "longer allowed, so you must provide a chat template if the tokenizer "
                                               "does not define one.", "type": "BadRequestError", "code": 400}})
                elif prompt == "html":
                    self._send(200, None, raw=b"<html><body>Bad Gateway from the proxy</body></html>",
                               ctype="text/html")
                elif prompt == "error-200":
                    self._send(200, {"error": {"message": "model overloaded", "type": "server_error"}})
                elif prompt == "no-choices":
                    self._send(200, {"id": "x", "object": "text_completion", "result": "hello"})
                elif prompt in BAD_CHOICES:
                    self._send(200, {**_completion(prompt, n), "choices": BAD_CHOICES[prompt](n)})
                else:
                    self._send(200, _completion(prompt, n))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


def engine(server, **kw):
    kw.setdefault("backoff", 0.01)
    return OpenAIEngine(server.base_url, "m", **kw)


@pytest.mark.parametrize("prompt", ["trickle", "trickle-headers", "silent"])
def test_a_stuck_endpoint_ends_in_bounded_time(server, prompt):
    # timeout is the whole attempt's deadline, not a per-read one: a trickling server cannot extend it
    with engine(server, timeout=0.6, max_retries=1) as e:
        start = time.monotonic()
        with pytest.raises(EngineRequestError, match=r"prompts\[0\] failed after 2 attempts: APITimeoutError.*0.6 s"):
            e.generate([prompt], max_new_tokens=4)
        assert time.monotonic() - start < 2.5


def test_call_timeout_bounds_the_whole_call(server):
    with engine(server, timeout=30, call_timeout=0.5) as e:
        start = time.monotonic()
        with pytest.raises(EngineRequestError, match=r"did not finish within call_timeout=0.5 s \(1 of 2 requests"):
            e.generate(["fine", "silent"], max_new_tokens=4)
        assert time.monotonic() - start < 1.5


def test_retry_after_is_honoured(server):
    with engine(server, backoff=0.01) as e:
        out = e.generate(["retry-after1"], max_new_tokens=4)
    assert out[0][0].text == "retry-after1|0"
    first, second = server.times["retry-after1"]
    assert second - first >= 0.95  # waited what the server asked, not the 0.01 s backoff


def test_a_retry_after_shorter_than_the_backoff_is_honoured(server):
    """The fix for Retry-After: 0 (retried at once, forever) made every wait at least the engine's own backoff, so
    a server asking for 1 s was made to wait 2.25-3 s here (and the README said Retry-After is honoured). A
    Retry-After is now honoured as given; only one under MIN_RETRY_AFTER waits the backoff instead."""
    with engine(server, backoff=3.0) as e:
        assert e.generate(["retry-after1"], max_new_tokens=4)[0][0].text == "retry-after1|0"
    first, second = server.times["retry-after1"]
    assert 0.95 <= second - first < 1.5  # the server's 1 s, not the backoff's 2.25-3 s
    with engine(server, backoff=0.3) as e:
        assert e.generate(["retry-after0.01"], max_new_tokens=4)[0][0].text == "retry-after0.01|0"
    first, second = server.times["retry-after0.01"]
    assert second - first >= 0.22  # under MIN_RETRY_AFTER: the backoff (0.3 s * U(0.75, 1)), not 0.01 s


def test_retry_after_beyond_the_budget_fails_at_once_naming_the_setting(server):
    with engine(server, retry_budget=0.5) as e:
        start = time.monotonic()
        with pytest.raises(EngineRequestError, match=r"asked to retry after 1 s.*retry budget of 0.5 s: retry_budget"):
            e.generate(["always-429"], max_new_tokens=4)
        assert time.monotonic() - start < 0.9  # did not sleep 1 s to fail afterwards
    with engine(server, retry_budget=2.5) as e:  # within the budget: retried twice (1 s + 1 s), then given up
        with pytest.raises(EngineRequestError, match=r"failed after 3 attempts: RateLimitError"):
            e.generate(["always-429"], max_new_tokens=4)


@pytest.mark.parametrize("prompt", ["always-503-ra0", "always-429-ms0"])
def test_retry_after_zero_still_ends_within_the_budget(server, prompt):
    """A server asking to retry after 0 s was retried at once, forever: the wait came from the server and the
    budget only counts waiting (thousands of requests a second, no end). Each wait is now at least the engine's
    own backoff, so the budget ends it."""
    with engine(server, backoff=0.05, retry_budget=0.3, call_timeout=5) as e:
        start = time.monotonic()
        with pytest.raises(EngineRequestError, match=r"another retry would exceed the retry budget of 0.3 s"):
            e.generate([prompt], max_new_tokens=4)
        assert time.monotonic() - start < 2
    assert 2 <= len(server.times[prompt]) <= 6  # backoffs of ~0.05, 0.1, 0.2 s fill the 0.3 s budget


def test_zero_backoff_needs_a_retry_count():
    """With no wait between attempts the budget (which counts waiting) could never end a retrying request."""
    from alignfast.ops import AlignfastArgumentError

    for name in ("backoff", "backoff_max"):
        with pytest.raises(AlignfastArgumentError, match=rf"'{name}' must be > 0 when max_retries is None"):
            OpenAIEngine("http://127.0.0.1:1/v1", "m", **{name: 0})
    OpenAIEngine("http://127.0.0.1:1/v1", "m", backoff=0, max_retries=2)  # a count bounds it


@pytest.mark.parametrize("prompt, quoted", [
    ("html", r"not JSON: '<html><body>Bad Gateway from the proxy</body></html>'"),
    ("error-200", r"answered with an error: .*model overloaded"),
    ("no-choices", r"has no 'choices': .*\"result\": \"hello\""),
])
def test_malformed_answers_are_quoted(server, prompt, quoted):
    with engine(server) as e:
        with pytest.raises(EngineRequestError, match=rf"prompts\[0\] failed on its first attempt: malformed "
                                                      rf"response: .*{quoted}"):
            e.generate([prompt], max_new_tokens=4)
    assert len(server.times[prompt]) == 1  # not retried


@pytest.mark.parametrize("api, prompt, n, quoted", [
    ("completions", "no-text", 1, r"malformed choice \(no text string\)"),
    ("completions", "int-text", 1, r"malformed choice \(no text string\): .*\"text\": 42"),
    ("completions", "null-index", 2, r"malformed choice \(its index is not an integer\)"),
    ("completions", "str-index", 12, r"malformed choice \(its index is not an integer\)"),
    ("completions", "dup-index", 2, r"choices have indices \[0, 0\], not 0..1"),
    ("chat", "message-str", 1, r"malformed choice \(no message object\): .*\"message\": \"hello\""),
    ("chat", "message-int", 1, r"malformed choice \(no message content string\)"),
])
def test_malformed_choices_are_malformed_responses(server, api, prompt, n, quoted):
    """Choices without usable text were accepted or misreported: a missing text became an empty completion,
    "text": 42 came back as an int, a null index raised TypeError (sorting), a string message AttributeError,
    string indices sorted "10" before "2", duplicate indices passed. Each is now a malformed response, not
    retried."""
    with engine(server, api=api) as e:
        with pytest.raises(EngineRequestError, match=rf"prompts\[0\] failed on its first attempt: malformed "
                                                      rf"response: .*{quoted}"):
            e.generate([prompt], max_new_tokens=4, n=n, temperature=0.5)  # sampled: a greedy call asks n=1
    assert len(server.times[prompt]) == 1


def test_null_chat_content_is_an_empty_completion(server):
    """The chat API allows a null content (a refusal, a reasoning model out of tokens): an empty text."""
    with engine(server, api="chat") as e:
        assert e._parse(json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": None},
                                                 "finish_reason": "length"}]}), 1)[0].text == ""


def test_generate_after_close_is_a_clear_error(server):
    e = engine(server)
    assert e.generate(["a"], max_new_tokens=2)[0][0].text == "a|0"
    e.close()
    e.close()  # idempotent
    with pytest.raises(EngineRequestError, match=r"generate\(\) called after close\(\)"):
        e.generate(["a"], max_new_tokens=2)


def test_usage_counts_the_target_tokens(server):
    with engine(server) as e:
        out = e.generate(["a", "b"], max_new_tokens=4, n=2)
    assert [[c.generated_tokens for c in r] for r in out] == [[3, 3], [3, 3]]  # 6 completion tokens per request


def test_check_endpoint_names_the_url(server, caplog):
    engine(server).check_endpoint(timeout=2)  # fine
    with pytest.raises(EngineRequestError, match=r"/models answered HTTP 404 \(does base_url lack its /v1\?\)"):
        OpenAIEngine(server.base_url.removesuffix("/v1"), "m").check_endpoint(timeout=2)
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(EngineRequestError, match=rf"cannot reach the target endpoint http://127.0.0.1:{port}/v1"):
        OpenAIEngine(f"http://127.0.0.1:{port}/v1", "m").check_endpoint(timeout=2)
    assert time.monotonic() - start < 2.5
    with caplog.at_level(logging.WARNING, logger="alignfast.rollout"):
        OpenAIEngine(server.base_url, "other-model").check_endpoint(timeout=2)
    assert "does not list model 'other-model'" in caplog.text


def test_cli_checks_the_endpoint_before_loading_models(tmp_path, capsys):
    from pathlib import Path

    from alignfast.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    toy = str(Path(__file__).resolve().parents[2] / "configs" / "toy.yaml")
    start = time.monotonic()
    code = main(["train", "--config", toy, "--trainer.output_dir", str(tmp_path / "run"), "--target.engine", "openai",
                 "--target.base_url", f"http://127.0.0.1:{port}/v1", "--prompter.model", str(tmp_path / "absent")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    # the endpoint is named, and it failed before the (absent) prompter was looked for
    assert f"cannot reach the target endpoint http://127.0.0.1:{port}/v1" in err[0] and "absent" not in err[0]
    assert time.monotonic() - start < 60  # imports only: no model was loaded (timings swing on a busy machine)


def test_vllm_engine_after_close_is_a_clear_error():
    """The same mistake on the vLLM engine (its LLM is dropped by close()); no vLLM needed to check it."""
    from alignfast.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)  # as close() leaves it
    engine.llm = None
    with pytest.raises(EngineRequestError, match=r"VLLMEngine: generate\(\) called after close\(\)"):
        engine.generate(["a"], max_new_tokens=2)


def test_retry_after_header_forms():
    from email.utils import formatdate

    from alignfast.rollout.openai_engine import _retry_after

    class R:
        def __init__(self, **headers):
            self.headers = headers

    assert _retry_after(R(**{"retry-after": "2"})) == 2.0
    assert _retry_after(R(**{"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    assert 8 < _retry_after(R(**{"retry-after": formatdate(time.time() + 10, usegmt=True)})) <= 10
    assert _retry_after(R(**{"retry-after": "soon"})) is None and _retry_after(R()) is None
    assert _retry_after(R(**{"retry-after": "-3"})) is None and _retry_after(None) is None


def test_a_chat_request_to_a_base_model_says_to_ask_it_in_completions(server):
    """A run file's openai target asks in chat by default; a served base model (no chat template) refuses that with
    a 400, and the one-line failure says which setting asks it in completions."""
    with engine(server, api="chat") as e:
        with pytest.raises(EngineRequestError, match=r"HTTP 400|BadRequestError") as err:
            e.generate(["base-model"], max_new_tokens=2)
    assert "chat template" in str(err.value) and str(err.value).endswith(
        "(api='chat' needs a served model with a chat template; ask a base model with api='completions': "
        "target.api: completions, or trainer.target_use_chat_template: false, in a run file)")
    with engine(server, api="completions") as e:
        assert e.generate(["base-model"], max_new_tokens=2)[0][0].text == "base-model|0"
    with engine(server, api="chat") as e:  # other failures get no such hint
        with pytest.raises(EngineRequestError) as err:
            e.generate(["error-200"], max_new_tokens=2)
    assert "api='completions'" not in str(err.value)
