"""OpenAIEngine: a frozen target behind an OpenAI-compatible HTTP endpoint (a vLLM or SGLang server,
or a hosted model): the black-box setting Align-Pro is built for, where only generations can be had.

Each prompt is one request (`n` samples via the API's `n`, or n requests when the server does not
support it), sent from a thread pool of `max_concurrency` workers through the `openai` SDK. Requests
that fail with a retryable error (timeout, connection error, HTTP 408/409/429/5xx) are retried up to
`max_retries` times after an exponential backoff with jitter:

    wait_k = min(backoff_max, backoff * 2**k) * U(0.75, 1)      (k = 0, 1, ... retries so far)

Any other error (400, 401, 404, ...), or a retryable one that outlives its retries, cancels the
requests not yet started and raises EngineRequestError naming the prompt and the last error.

Endpoints: "completions" sends the prompt as is (text, or token ids, which the completions API
accepts); "chat" sends it as one user message (after an optional system message), text only.
Completions carry text only (token_ids is empty): the endpoint's tokenizer is not ours.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from alignfast.rollout._sampling import request_seeds
from alignfast.rollout.engine import Completion, EngineRequestError, Prompt, TargetEngine, check_call

RETRYABLE_STATUS = frozenset({408, 409, 429})


def _import_openai():
    try:
        import openai
    except ImportError as err:
        raise ImportError("OpenAIEngine needs the 'openai' package, which is not installed: "
                          "pip install 'alignfast[openai]' (or pip install openai)") from err
    return openai


class OpenAIEngine(TargetEngine):
    """Frozen-target generation through an OpenAI-compatible API.

    base_url: e.g. "http://127.0.0.1:8000/v1". model: the served model's name.
    api: "completions" or "chat". api_key: default $OPENAI_API_KEY, else "EMPTY" (local servers).
    max_concurrency: requests in flight at once. timeout: seconds per request attempt.
    max_retries, backoff, backoff_max: see the module docstring.
    n_per_request: send `n` in one request (False: n requests of one sample each).
    send_seed: pass a per-prompt seed (derived from the call's seed, the prompt and its occurrence).
    system_prompt: for api="chat", a system message before each prompt.
    extra_body: extra JSON fields for every request (e.g. vLLM's {"top_k": 50}).
    """

    def __init__(self, base_url: str, model: str, *, api: str = "completions", api_key: str | None = None,
                 max_concurrency: int = 8, timeout: float = 60.0, max_retries: int = 3, backoff: float = 0.5,
                 backoff_max: float = 8.0, n_per_request: bool = True, send_seed: bool = True,
                 system_prompt: str | None = None, extra_body: dict | None = None):
        from alignfast.ops._checks import choice, fail, non_negative, positive

        self.api = choice("api", api, ("completions", "chat"))
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            fail("max_concurrency", f"must be an integer >= 1, got {max_concurrency!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            fail("max_retries", f"must be an integer >= 0, got {max_retries!r}")
        self.timeout = positive("timeout", timeout)
        self.backoff = non_negative("backoff", backoff)
        self.backoff_max = non_negative("backoff_max", backoff_max)
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.model, self.n_per_request, self.send_seed = model, bool(n_per_request), bool(send_seed)
        self.system_prompt, self.extra_body = system_prompt, dict(extra_body or {})
        self._openai = _import_openai()
        # retries are ours (backoff above, errors reported per prompt): the SDK must not retry too
        self._client = self._openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY")
                                           or "EMPTY", timeout=self.timeout, max_retries=0)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # --- one request ------------------------------------------------------------------------------

    def _request(self, prompt, *, n: int, seed: int | None, args) -> list[Completion]:
        body = dict(model=self.model, n=n, max_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p if not args.greedy else 1.0)
        if seed is not None:
            body["seed"] = seed
        if self.extra_body:
            body["extra_body"] = self.extra_body
        if self.api == "chat":
            messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
            resp = self._client.chat.completions.create(messages=[*messages, {"role": "user", "content": prompt}],
                                                        **body)
            texts = [(c.index, c.message.content or "", c.finish_reason) for c in resp.choices]
        else:
            resp = self._client.completions.create(prompt=prompt, **body)
            texts = [(c.index, c.text or "", c.finish_reason) for c in resp.choices]
        if len(texts) != n:
            raise EngineRequestError(f"the endpoint returned {len(texts)} choices for n={n}")
        return [Completion(text, [], "length" if reason == "length" else "stop") for _, text, reason in sorted(texts)]

    def _retryable(self, err: Exception) -> bool:
        o = self._openai
        if isinstance(err, (o.APITimeoutError, o.APIConnectionError)):
            return True
        if isinstance(err, o.APIStatusError):
            return err.status_code in RETRYABLE_STATUS or err.status_code >= 500
        return False

    def _with_retries(self, index: int, prompt, stop: threading.Event, **kwargs) -> list[Completion]:
        attempt = 0
        while True:
            if stop.is_set():
                return []
            try:
                return self._request(prompt, **kwargs)
            except Exception as err:  # noqa: BLE001 - classified below, re-raised with context
                if not self._retryable(err) or attempt >= self.max_retries:
                    tries = f"after {attempt + 1} attempts" if attempt else "on its first attempt"
                    raise EngineRequestError(f"OpenAIEngine: the request for prompts[{index}] failed {tries}: "
                                             f"{type(err).__name__}: {err}") from err
                time.sleep(min(self.backoff_max, self.backoff * 2**attempt) * random.uniform(0.75, 1.0))
                attempt += 1

    # --- the call -------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, n: int = 1, seed: int | None = None) -> list[list[Completion]]:
        from alignfast.ops._checks import fail

        args, prompt_list = check_call(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p, n=n, seed=seed)
        if not prompt_list:
            return []
        if self.api == "chat":
            for i, p in enumerate(prompt_list):
                if not isinstance(p, str):
                    fail(f"prompts[{i}]", "must be text for api='chat' (token ids need api='completions')")
        seeds = request_seeds(prompt_list, args.seed) if (self.send_seed and args.seed is not None) else None

        # (prompt index, samples in this request, seed) per request
        jobs = []
        for i in range(len(prompt_list)):
            s = None if seeds is None else seeds[i]
            if self.n_per_request:
                jobs.append((i, args.n, s))
            else:
                jobs.extend((i, 1, None if s is None else (s + k) & 0x7FFFFFFF) for k in range(args.n))
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="alignfast-openai")
        stop = threading.Event()
        futures = [self._pool.submit(self._with_retries, i, prompt_list[i], stop, n=k, seed=s, args=args)
                   for i, k, s in jobs]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f.done() and f.exception() is not None), None)
        if failed is not None:
            stop.set()
            for f in pending:
                f.cancel()
            raise failed.exception()
        results: list[list[Completion]] = [[] for _ in prompt_list]
        for (i, _, _), f in zip(jobs, futures):
            results[i].extend(f.result())
        return results

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()
            self._client = None
