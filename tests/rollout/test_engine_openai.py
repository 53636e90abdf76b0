"""OpenAIEngine against a stub OpenAI-compatible server on 127.0.0.1 started by the test.

The stub answers from the prompt text, so each test chooses the server's behaviour by its prompts:
    "flaky<k> ..."   HTTP 500 for the first k requests with this prompt, then a normal answer
    "broken ..."     HTTP 500 always          "refused ..."  HTTP 400 (not retryable)
    "slow ..."       answers after 1.5 s      "slow-once ..." only the first request is slow
    anything else    n choices "<prompt>|<i>|seed=<seed>", finish_reason "length" when max_tokens < 4
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from alignfast.ops import AlignfastArgumentError  # noqa: E402
from alignfast.rollout import EngineRequestError, OpenAIEngine  # noqa: E402


class StubServer:
    def __init__(self):
        self.requests: list[tuple[str, dict]] = []
        self.seen = Counter()
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append((self.path, body))
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    status, payload = stub.answer(self.path, body)
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, path: str, body: dict):
        chat = path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        key = json.dumps(prompt)
        with self.lock:
            self.seen[key] += 1
            count = self.seen[key]
        text = prompt if isinstance(prompt, str) else "ids:" + ",".join(map(str, prompt))
        time.sleep(0.05)  # long enough for requests to overlap
        if text.startswith("flaky") and count <= int(text[5]):
            return 500, {"error": {"message": "temporary failure", "type": "server_error"}}
        if text.startswith("broken"):
            return 500, {"error": {"message": "the model crashed", "type": "server_error"}}
        if text.startswith("refused"):
            return 400, {"error": {"message": "bad prompt", "type": "invalid_request_error"}}
        if text.startswith("slow") and (count == 1 or not text.startswith("slow-once")):
            time.sleep(1.5)
        n = body.get("n", 1)
        reason = "length" if body["max_tokens"] < 4 else "stop"
        choices = []
        for i in reversed(range(n)):  # out of order on purpose
            out = f"{text}|{i}|seed={body.get('seed')}"
            choice = {"index": i, "finish_reason": reason, "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": out}} if chat else {"text": out})
            choices.append(choice)
        return 200, {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0,
                     "model": body["model"], "choices": choices,
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    server = StubServer()
    yield server
    server.close()


def engine_for(stub, **kwargs):
    kwargs.setdefault("backoff", 0.01)
    return OpenAIEngine(stub.base_url, "stub-model", **kwargs)


def test_engine_openai_completions_n_and_order(stub):
    prompts = [f"prompt {i}" for i in range(12)] + [[5, 6, 7]]
    with engine_for(stub, max_concurrency=4) as engine:
        out = engine.generate(prompts, max_new_tokens=8, temperature=0.7, top_p=0.9, n=3, seed=1)
    assert len(out) == len(prompts) and all(len(r) == 3 for r in out)
    for p, r in zip(prompts, out):
        text = p if isinstance(p, str) else "ids:5,6,7"
        assert [c.text.split("|")[:2] for c in r] == [[text, "0"], [text, "1"], [text, "2"]]
        assert all(c.finish_reason == "stop" and c.token_ids == [] for c in r)
    bodies = [b for _, b in stub.requests]
    assert len(bodies) == len(prompts)  # one request per prompt, n in the request
    assert all((b["n"], b["max_tokens"], b["temperature"], b["top_p"], b["model"]) == (3, 8, 0.7, 0.9, "stub-model")
               for b in bodies)
    assert {json.dumps(b["prompt"]) for b in bodies} == {json.dumps(p) for p in prompts}
    assert len({b["seed"] for b in bodies}) == len(prompts)
    assert 1 < stub.max_in_flight <= 4


def test_engine_openai_chat_one_request_per_sample(stub):
    with engine_for(stub, api="chat", n_per_request=False, system_prompt="be brief") as engine:
        out = engine.generate(["hi", "there"], max_new_tokens=2, n=2, temperature=0.7)
    assert [[c.text.split("|")[0] for c in r] for r in out] == [["hi", "hi"], ["there", "there"]]
    assert all(c.finish_reason == "length" for r in out for c in r)
    assert len(stub.requests) == 4
    for path, body in stub.requests:
        assert path.endswith("/chat/completions") and body["n"] == 1 and "seed" not in body
        assert body["messages"][0] == {"role": "system", "content": "be brief"}
        assert body["temperature"] == 0.7 and body["top_p"] == 1.0


@pytest.mark.parametrize("n_per_request", [True, False])
def test_engine_openai_greedy_asks_once_per_prompt_and_repeats_the_answer(stub, n_per_request):
    """vLLM's server answers n > 1 at temperature 0 with a 400 ('n must be 1 when using greedy sampling'), and greedy
    decoding has one answer: a greedy call asks once per prompt and returns its answer n times (as copies)."""
    with engine_for(stub, n_per_request=n_per_request) as engine:
        out = engine.generate(["hi", "there"], max_new_tokens=2, n=3)
    assert len(stub.requests) == 2 and all(body["n"] == 1 for _, body in stub.requests)
    assert [len(r) for r in out] == [3, 3] and all(len({c.text for c in r}) == 1 for r in out)
    assert out[0][0] is not out[0][1] and out[0][0] == out[0][1]


def test_engine_openai_retries_a_server_error_then_succeeds(stub):
    with engine_for(stub, max_retries=3) as engine:
        out = engine.generate(["flaky2 a", "fine"], max_new_tokens=5)
    assert out[0][0].text.startswith("flaky2 a|0") and out[1][0].text.startswith("fine|0")
    assert stub.seen[json.dumps("flaky2 a")] == 3  # two 500s, then the answer


def test_engine_openai_persistent_error_surfaces_clearly(stub):
    engine = engine_for(stub, max_retries=2)
    with pytest.raises(EngineRequestError, match=r"prompts\[1\] failed after 3 attempts: InternalServerError.*crashed"):
        engine.generate(["fine", "broken x", "fine too"], max_new_tokens=5)
    assert stub.seen[json.dumps("broken x")] == 3
    # a non-retryable error fails at once
    with pytest.raises(EngineRequestError, match=r"prompts\[0\] failed on its first attempt: BadRequestError"):
        engine.generate(["refused y"], max_new_tokens=5)
    assert stub.seen[json.dumps("refused y")] == 1
    engine.close()


def test_engine_openai_timeout(stub):
    engine = engine_for(stub, timeout=0.3, max_retries=1)
    start = time.perf_counter()
    with pytest.raises(EngineRequestError, match=r"prompts\[0\] failed after 2 attempts: APITimeoutError"):
        engine.generate(["slow z"], max_new_tokens=5)
    assert time.perf_counter() - start < 1.4  # gave up on its timeouts, did not wait for the server
    # a timeout that is retried and then answered
    out = engine.generate(["slow-once w"], max_new_tokens=5)
    assert out[0][0].text.startswith("slow-once w|0")
    engine.close()


def test_engine_openai_empty_and_bad_arguments(stub):
    engine = engine_for(stub, api="chat")
    assert engine.generate([], max_new_tokens=3) == [] and stub.requests == []
    with pytest.raises(AlignfastArgumentError, match=r"prompts\[1\]"):
        engine.generate(["a", [1, 2]], max_new_tokens=3)
    with pytest.raises(AlignfastArgumentError, match="'top_p'"):
        engine.generate(["a"], max_new_tokens=3, top_p=2.0)
    with pytest.raises(AlignfastArgumentError, match="'api'"):
        OpenAIEngine(stub.base_url, "m", api="embeddings")
    with pytest.raises(AlignfastArgumentError, match="'timeout'"):
        OpenAIEngine(stub.base_url, "m", timeout=0)
    engine.close()
    engine.close()
