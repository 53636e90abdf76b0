"""A deterministic OpenAI-compatible completions endpoint on 127.0.0.1, served by an HFEngine (greedy):
the shared-target placement in miniature. It records how many requests were in flight at once."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HFCompletionsStub:
    def __init__(self, model_path: str):
        from alignfast.rollout import HFEngine

        self.engine = HFEngine(model_path)
        self.lock = threading.Lock()  # one generation at a time (the engine is not thread-safe)
        self.count_lock = threading.Lock()
        self.in_flight = self.max_in_flight = self.requests = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.count_lock:
                    stub.requests += 1
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    data = json.dumps(stub.answer(body)).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with stub.count_lock:
                        stub.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, body: dict) -> dict:
        if body.get("temperature", 0) != 0:
            raise ValueError("the stub answers greedily only")
        with self.lock:
            completions = self.engine.generate([body["prompt"]], max_new_tokens=body["max_tokens"],
                                               n=body.get("n", 1))[0]
        choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                   for i, c in enumerate(completions)]
        return {"id": "stub", "object": "text_completion", "created": 0, "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
