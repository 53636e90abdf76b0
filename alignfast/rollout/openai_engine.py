"""OpenAIEngine: a frozen target behind an OpenAI-compatible HTTP endpoint (a vLLM or SGLang server,
or a hosted model): the black-box setting Align-Pro is built for, where only generations can be had.

Each prompt is one request (`n` samples via the API's `n`, or n requests when the server does not
support it), sent through the `openai` SDK's async client, `max_concurrency` at a time, on an event loop
the engine runs in a daemon thread (so `generate` is an ordinary blocking call, usable from a notebook too).

Deadlines. Every attempt must bring a complete response within `timeout` seconds: an overall deadline,
not a per-read one, so a server that trickles a byte at a time cannot hold a request forever. The whole
`generate` call may also be bounded with `call_timeout`. Either ends in EngineRequestError.

Retries. A retryable failure (timeout, connection error, HTTP 408/409/429/5xx) is retried after

    wait_k = Retry-After                                     (when the server sends one >= MIN_RETRY_AFTER, 0.05 s)
             min(backoff_max, backoff * 2**k) * U(0.75, 1)   (otherwise)

(k = retries so far) while the waits of that request stay within `retry_budget` seconds in total (and,
when set, at most `max_retries` times). The server's Retry-After is honoured as given, shorter or longer
than the engine's own backoff, as openai-python does; one under MIN_RETRY_AFTER (a server asking for 0 s)
waits the backoff instead: the budget counts waiting, and retries that do not wait would never use it up. The
default budget, 30 s, outlasts a server restart. A request that still fails, or fails with an error
retrying cannot fix (400, 401, 404, a malformed response), cancels the requests not yet answered and raises
EngineRequestError naming the prompt and quoting the server.

Endpoints: "completions" sends the prompt as is (text, or token ids, which the completions API
accepts); "chat" sends it as one user message (after an optional system message), text only.
Completions carry text only (token_ids is empty: the endpoint's tokenizer is not ours); their num_tokens
comes from the response's `usage.completion_tokens` (split evenly over the n choices of one request).
A chat choice whose content is null is an empty completion; a choice without a text string, or indices
other than 0..n-1, is a malformed response.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Sequence

from alignfast.rollout._sampling import request_seeds
from alignfast.rollout.engine import Completion, EngineRequestError, Prompt, TargetEngine, check_call, repeat_greedy

RETRYABLE_STATUS = frozenset({408, 409, 429})
DEFAULT_RETRY_BUDGET = 30.0  # seconds of waiting between attempts, per request: a server restart fits in it
MIN_RETRY_AFTER = 0.05  # seconds: a shorter Retry-After waits the engine's backoff (see the module docstring)
_log = logging.getLogger("alignfast.rollout")


def _import_openai():
    try:
        import openai
    except ImportError as err:
        raise ImportError("OpenAIEngine needs the 'openai' package, which is not installed: "
                          "pip install 'alignfast[openai]' (or pip install openai)") from err
    return openai


class _Malformed(Exception):
    """A 2xx response that is not a completion (HTML, an error object, no choices): not retried."""


class _Deadline(Exception):
    """An attempt that brought no complete response within `timeout` (reported as APITimeoutError)."""


def _quote(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


class OpenAIEngine(TargetEngine):
    """Frozen-target generation through an OpenAI-compatible API.

    base_url: e.g. "http://127.0.0.1:8000/v1". model: the served model's name.
    api: "completions" or "chat". api_key: default $OPENAI_API_KEY, else "EMPTY" (local servers).
    max_concurrency: requests in flight at once. timeout: seconds for one attempt, all of it (connect,
    send, wait, read). call_timeout: seconds for one whole `generate` call (None: bounded by the others).
    max_retries (None: no count limit; backoff and backoff_max must then be > 0), retry_budget, backoff,
    backoff_max: see the module docstring.
    n_per_request: send `n` in one request (False: n requests of one sample each).
    send_seed: pass a per-prompt seed (derived from the call's seed, the prompt and its occurrence).
    system_prompt: for api="chat", a system message before each prompt.
    extra_body: extra JSON fields for every request (e.g. vLLM's {"top_k": 50}).
    """

    def __init__(self, base_url: str, model: str, *, api: str = "completions", api_key: str | None = None,
                 max_concurrency: int = 8, timeout: float = 60.0, max_retries: int | None = None,
                 retry_budget: float = DEFAULT_RETRY_BUDGET, backoff: float = 0.5, backoff_max: float = 8.0,
                 call_timeout: float | None = None, n_per_request: bool = True, send_seed: bool = True,
                 system_prompt: str | None = None, extra_body: dict | None = None):
        from alignfast.ops._checks import choice, fail, non_negative, optional_text, positive

        self.api = choice("api", api, ("completions", "chat"))
        optional_text("system_prompt", system_prompt)
        if system_prompt is not None and self.api != "chat":  # a completions request has no messages to put it in
            fail("system_prompt", "is the chat's system message, sent only with api='chat'; with api='completions' "
                 "the prompt is sent as it is: put the text in the prompt instead")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            fail("max_concurrency", f"must be an integer >= 1, got {max_concurrency!r}")
        if max_retries is not None and (isinstance(max_retries, bool) or not isinstance(max_retries, int)
                                        or max_retries < 0):
            fail("max_retries", f"must be an integer >= 0 or None, got {max_retries!r}")
        self.timeout = positive("timeout", timeout)
        self.call_timeout = None if call_timeout is None else positive("call_timeout", call_timeout)
        self.retry_budget = non_negative("retry_budget", retry_budget)
        self.backoff = non_negative("backoff", backoff)
        self.backoff_max = non_negative("backoff_max", backoff_max)
        if max_retries is None:  # the budget counts waiting time: only waits that grow it can end the retries
            for name, value in (("backoff", self.backoff), ("backoff_max", self.backoff_max)):
                if value == 0:
                    fail(name, "must be > 0 when max_retries is None: the retry budget counts the waits between "
                         "attempts, so with no wait a failing request would be retried forever")
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.model, self.n_per_request, self.send_seed = model, bool(n_per_request), bool(send_seed)
        self.system_prompt, self.extra_body = system_prompt, dict(extra_body or {})
        self.base_url = str(base_url)
        self._api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self._openai = _import_openai()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client = None  # an AsyncOpenAI, created on the engine's loop (it belongs to that loop)
        self._closed = False

    # --- the event loop -----------------------------------------------------------------------------

    def _run(self, coro, *, what: str):
        """Run `coro` on the engine's loop and wait for it; Ctrl-C cancels it there too."""
        with self._lock:
            if self._closed:
                coro.close()
                raise EngineRequestError(f"OpenAIEngine: {what} called after close(); create a new engine")
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="alignfast-openai", daemon=True)
                self._thread.start()
            loop = self._loop
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _get_client(self):
        if self._client is None:
            # retries and deadlines are ours (see the module docstring): the SDK must not retry too
            self._client = self._openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key,
                                                    timeout=self.timeout, max_retries=0)
        return self._client

    # --- one request ------------------------------------------------------------------------------

    async def _request(self, prompt, *, n: int, seed: int | None, args) -> list[Completion]:
        body = dict(model=self.model, n=n, max_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p if not args.greedy else 1.0)
        if seed is not None:
            body["seed"] = seed
        if self.extra_body:
            body["extra_body"] = self.extra_body
        client = self._get_client()
        if self.api == "chat":
            messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
            raw = await client.chat.completions.with_raw_response.create(
                messages=[*messages, {"role": "user", "content": prompt}], **body)
        else:
            raw = await client.completions.with_raw_response.create(prompt=prompt, **body)
        return self._parse(raw.text, n)

    def _parse(self, text: str, n: int) -> list[Completion]:
        """Completions from a 2xx body, or _Malformed quoting what the server said instead."""
        try:
            data = json.loads(text)
        except ValueError:
            raise _Malformed(f"the endpoint's answer is not JSON: {_quote(text)}") from None
        if not isinstance(data, dict):
            raise _Malformed(f"the endpoint answered {_quote(text)}, not a completion object")
        if data.get("error"):
            raise _Malformed(f"the endpoint answered with an error: {_quote(json.dumps(data['error']))}")
        choices = data.get("choices")
        if not isinstance(choices, list):
            raise _Malformed(f"the endpoint's answer has no 'choices': {_quote(text)}")
        texts = [self._choice(c, position) for position, c in enumerate(choices)]
        if len(texts) != n:
            raise _Malformed(f"the endpoint returned {len(texts)} choices for n={n}: {_quote(text)}")
        indices = sorted(index for index, _, _ in texts)
        if indices != list(range(n)):  # samples are put in index order: each of 0..n-1 must be there once
            raise _Malformed(f"the endpoint's choices have indices {indices}, not 0..{n - 1}: {_quote(text)}")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        total = usage.get("completion_tokens")
        counts = [None] * n
        if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
            counts = [total // n + (1 if i < total % n else 0) for i in range(n)]
        return [Completion(t, [], "length" if reason == "length" else "stop", num_tokens=k)
                for (_, t, reason), k in zip(sorted(texts, key=lambda x: x[0]), counts)]

    def _choice(self, c, position: int) -> tuple[int, str, str | None]:
        """(index, text, finish_reason) of one choice, or _Malformed. A missing index is the choice's position;
        a chat message whose content is null (a refusal, or a reasoning model that spent max_tokens thinking)
        is an empty completion, as the chat API allows it. Anything else that is not text is malformed, never
        an empty or non-string completion."""
        def malformed(why: str):
            return _Malformed(f"the endpoint's answer has a malformed choice ({why}): {_quote(json.dumps(c))}")

        if not isinstance(c, dict):
            raise malformed("not an object")
        index = c.get("index", position)
        if isinstance(index, bool) or not isinstance(index, int):
            raise malformed("its index is not an integer")
        if self.api == "chat":
            message = c.get("message")
            if not isinstance(message, dict):
                raise malformed("no message object")
            content = message.get("content")
            content = "" if content is None else content
        else:
            content = c.get("text")
        if not isinstance(content, str):
            raise malformed("no message content string" if self.api == "chat" else "no text string")
        return index, content, c.get("finish_reason")

    def _hint(self, err: BaseException) -> str:
        """What to change when a chat request reaches a model without a chat template (a base model served by
        vLLM answers 400, naming the chat template): a run file's openai target asks in chat by default."""
        if self.api == "chat" and "chat template" in str(err).lower() and \
                getattr(err, "status_code", None) == 400:
            return (" (api='chat' needs a served model with a chat template; ask a base model with api='completions': "
                    "target.api: completions, or trainer.target_use_chat_template: false, in a run file)")
        return ""

    def _classify(self, err: BaseException) -> tuple[bool, float | None]:
        """(retryable, Retry-After seconds or None)."""
        o = self._openai
        if isinstance(err, (_Deadline, o.APITimeoutError, o.APIConnectionError)):
            return True, None
        if isinstance(err, o.APIStatusError):
            retryable = err.status_code in RETRYABLE_STATUS or err.status_code >= 500
            return retryable, _retry_after(getattr(err, "response", None))
        return False, None

    async def _with_retries(self, index: int, prompt, **kwargs) -> list[Completion]:
        attempt, waited = 0, 0.0
        while True:
            try:
                return await asyncio.wait_for(self._request(prompt, **kwargs), self.timeout)
            except asyncio.TimeoutError:
                err: BaseException = _Deadline(f"no complete response within timeout={self.timeout:g} s")
            except Exception as e:  # noqa: BLE001 - classified below, re-raised with context
                err = e
            retryable, retry_after = self._classify(err)
            tries = f"after {attempt + 1} attempts" if attempt else "on its first attempt"
            name = "APITimeoutError" if isinstance(err, _Deadline) else type(err).__name__
            name = "malformed response" if isinstance(err, _Malformed) else name
            failure = f"OpenAIEngine ({self.base_url}): the request for prompts[{index}] failed {tries}: {name}: {err}"
            if not retryable or (self.max_retries is not None and attempt >= self.max_retries):
                raise EngineRequestError(failure + self._hint(err)) from err
            wait = min(self.backoff_max, self.backoff * 2**attempt) * random.uniform(0.75, 1.0)
            server_wait = retry_after is not None and retry_after >= MIN_RETRY_AFTER
            wait = retry_after if server_wait else wait  # see the module docstring: 0 s would never use the budget
            if waited + wait > self.retry_budget:
                asked = f"the server asked to retry after {retry_after:g} s, which" if server_wait \
                    else "another retry"
                raise EngineRequestError(f"{failure} ({asked} would exceed the retry budget of "
                                         f"{self.retry_budget:g} s: retry_budget sets it)") from err
            await asyncio.sleep(wait)
            waited += wait
            attempt += 1

    # --- the call -------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, n: int = 1, seed: int | None = None) -> list[list[Completion]]:
        from alignfast.ops._checks import fail

        if self._closed:
            raise EngineRequestError("OpenAIEngine: generate() called after close(); create a new engine")
        args, prompt_list = check_call(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p, n=n, seed=seed)
        if not prompt_list:
            return []
        if self.api == "chat":
            for i, p in enumerate(prompt_list):
                if not isinstance(p, str):
                    fail(f"prompts[{i}]", "must be text for api='chat' (token ids need api='completions')")
        seeds = request_seeds(prompt_list, args.seed) if (self.send_seed and args.seed is not None) else None

        # (prompt index, samples in this request, seed) per request; a greedy call asks once per prompt (vLLM's
        # server answers n > 1 at temperature 0 with a 400) and repeats the answer
        jobs = []
        for i in range(len(prompt_list)):
            s = None if seeds is None else seeds[i]
            if self.n_per_request:
                jobs.append((i, args.requested_n, s))
            else:
                jobs.extend((i, 1, None if s is None else (s + k) & 0x7FFFFFFF) for k in range(args.requested_n))
        answers = self._run(self._run_jobs(jobs, prompt_list, args), what="generate()")
        results: list[list[Completion]] = [[] for _ in prompt_list]
        for (i, _, _), got in zip(jobs, answers):
            results[i].extend(got)
        return repeat_greedy(results, args)

    async def _run_jobs(self, jobs, prompt_list, args) -> list[list[Completion]]:
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(i, k, s):
            async with gate:
                return await self._with_retries(i, prompt_list[i], n=k, seed=s, args=args)

        tasks = [asyncio.ensure_future(one(i, k, s)) for i, k, s in jobs]
        try:
            done, pending = await asyncio.wait(tasks, timeout=self.call_timeout, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in tasks if t in done and t.exception() is not None]
            if failed:
                raise failed[0].exception()
            if pending:
                raise EngineRequestError(
                    f"OpenAIEngine: generate() did not finish within call_timeout={self.call_timeout:g} s "
                    f"({len(done)} of {len(tasks)} requests to {self.base_url} answered)")
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- before a run -----------------------------------------------------------------------------

    def check_endpoint(self, timeout: float = 10.0, *, names: dict | None = None) -> None:
        """A cheap request (GET <base_url>/models) that fails fast, naming the URL, when the endpoint cannot
        serve this engine: nothing listening, a base_url without its /v1, a rejected API key. A model name the
        server does not list is a warning (some gateways route names they do not list). names: the caller's
        names of the settings the hints point at ({"base_url": "--upstream-url", "api_key": "--api-key-env"});
        by default the run file's (target.base_url, target.api_key_env)."""
        names = {"base_url": "base_url", "api_key": "target.api_key_env", **(names or {})}
        self._run(self._check_endpoint(timeout, names), what="check_endpoint()")

    async def _check_endpoint(self, timeout: float, names: dict) -> None:
        o = self._openai
        url = self.base_url.rstrip("/") + "/models"
        try:
            page = await asyncio.wait_for(self._get_client().models.list(), timeout)
        except asyncio.TimeoutError:
            raise EngineRequestError(f"OpenAIEngine: the target endpoint {url} did not answer within {timeout:g} s"
                                     ) from None
        except o.APIConnectionError as err:
            raise EngineRequestError(f"OpenAIEngine: cannot reach the target endpoint {self.base_url} "
                                     f"({type(err).__name__}: {err}); is the server running, and is "
                                     f"{names['base_url']} right?") from None
        except o.APIStatusError as err:
            key_hint = f" (check the API key: {names['api_key']})"
            hint = {404: f" (does {names['base_url']} lack its /v1?)", 401: key_hint, 403: key_hint}.get(
                err.status_code, "")
            raise EngineRequestError(f"OpenAIEngine: the target endpoint {url} answered HTTP {err.status_code}"
                                     f"{hint}: {_quote(err.message)}") from None
        except Exception as err:  # noqa: BLE001 - e.g. an HTML page where JSON was expected
            raise EngineRequestError(f"OpenAIEngine: the target endpoint {url} gave an unusable answer "
                                     f"({type(err).__name__}: {err}); is {names['base_url']} an OpenAI-compatible "
                                     "API?") from None
        served = [getattr(m, "id", None) for m in getattr(page, "data", None) or []]
        if served and self.model not in served:
            _log.warning("OpenAIEngine: %s does not list model %r (it serves %s); requests may fail", url, self.model,
                         ", ".join(map(str, served[:5])) + (", ..." if len(served) > 5 else ""))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            loop, thread, client = self._loop, self._thread, self._client
            self._loop = self._thread = self._client = None
        if loop is None:
            return
        if client is not None:
            try:
                asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=5)
            except Exception:  # noqa: BLE001 - closing: nothing left to report to
                pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()


def _retry_after(response) -> float | None:
    """Seconds from a Retry-After (seconds or an HTTP date) or retry-after-ms header; None when absent."""
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            v = float(ms) / 1000.0
            return v if math.isfinite(v) and v >= 0 else None
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        v = float(value)
        return v if math.isfinite(v) and v >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
