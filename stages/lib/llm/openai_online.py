"""The online backend: any OpenAI-compatible endpoint over aiohttp, with a concurrency cap, token
buckets, retries and a budget.

`OnlineBackend.run(requests, sampling, on_done)` sends every request at most `concurrency` at a
time, paced by requests-per-minute and tokens-per-minute token buckets and paused globally by
`Retry-After` / `x-ratelimit-*` headers. 429, 5xx, timeouts, dropped connections and malformed
bodies are retried with exponential back-off and full jitter up to `max_attempts`; then the request
is reported as failed with its reason (the next run retries it). A budget, when set, is checked
before each request is sent, using a worst-case estimate (prompt bytes as tokens plus the answer
budget), so it is never exceeded. 400, 401, 403 and 404 say the request itself is wrong (bad
parameter, key, URL or model): such an error stops the run at once (`TeacherStop`), no request still
queued is sent. `check` asks the models list (or sends one tiny request) before the first paid
request, so a wrong URL, key or model name fails in a second with the server's own words.

One HTTP stack, aiohttp, for the check and the requests; bodies are built and parsed by `openai_wire`
(throughput measured in docs/teacher-client.md).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import time
import urllib.parse
from dataclasses import replace

from stages.lib.llm.backend import OnDone, RunReport
from stages.lib.llm.endpoint import ApiParams, Price
from stages.lib.llm.openai_wire import (
    DEFAULT_BASE_URL,
    FATAL_STATUS,
    MESSAGE_CHARS,
    RETRYABLE_STATUS,
    HttpStatusError,
    MalformedResponse,
    RequestOptions,
    classify_status,
    completion_from_body,
    endpoint_of,
    error_code,
    error_message,
    online_teacher_id,
    public_url,
    redact,
    request_body,
    wait_from_headers,
)
from stages.lib.llm.types import Completion, Request, Sampling, TeacherStop, prompt_text
from stages.lib.progress import log

STOPPED = "stopped"  # the run stopped on a fatal error before this request was sent


class TokenBucket:
    """Refills at `per_minute / 60` per second and holds at most one second's worth (at least `min_capacity`)."""

    def __init__(self, per_minute: float, min_capacity: float = 1.0):
        self.rate = per_minute / 60.0
        self.capacity = max(min_capacity, self.rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, amount: float) -> None:
        amount = min(amount, self.capacity)
        async with self.lock:  # first come, first served
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= amount:
                    self.tokens -= amount
                    return
                await asyncio.sleep((amount - self.tokens) / self.rate)


class OnlineBackend:
    """Any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama): `chat` form asks Chat
    Completions, `completion` form Completions. `options`: model family, extra body fields. `api_key` comes
    from the environment (`backend.make_backend`) and never enters a key, a record or a log line."""

    def __init__(self, model: str, base_url: str | None, prompt_form: str, api_key: str, api: ApiParams | None = None,
                 price: Price | None = None, options: RequestOptions | None = None):
        self._key = api_key
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.shown_url = public_url(self.base_url)  # what messages quote: no credentials, no query string
        self.endpoint = endpoint_of(self.base_url)  # recorded with each answer, checked before one is served
        self.name, self.model, self.prompt_form = model, model, prompt_form
        self.teacher_id = online_teacher_id(model, self.endpoint)
        self.api = api or ApiParams()
        self.options = options or RequestOptions()
        self.request_fields = self.options.fields(model)  # extra body, reasoning budget: in the key when set
        self.price = price or Price()
        self.spent_usd = 0.0  # what the answers so far cost: the budget's measure
        self.checked = False

    def batch_client(self):
        """A synchronous `openai` client for the Batch API's files and batches endpoints (`openai_batch`)."""
        from openai import OpenAI

        return OpenAI(api_key=self._key, base_url=self.base_url, max_retries=5)

    # ------------------------------------------------------------ one HTTP request

    def _session(self):
        import aiohttp

        headers = {"Authorization": f"Bearer {self._key}", "Content-Type": "application/json"}
        for env, header in (("OPENAI_ORG_ID", "OpenAI-Organization"), ("OPENAI_PROJECT_ID", "OpenAI-Project")):
            if os.environ.get(env):
                headers[header] = os.environ[env]
        return aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self.api.timeout_s),
                                     connector=aiohttp.TCPConnector(limit=self.api.concurrency))

    async def _send(self, session, method: str, path: str, body: dict | None = None):
        """(status, content, headers) of one request; raises aiohttp's errors and asyncio's timeout."""
        data = json.dumps(body) if body is not None else None
        async with session.request(method, self.base_url + path, data=data) as r:
            return r.status, await r.read(), r.headers

    # ------------------------------------------------------------ the endpoint check

    def check(self) -> None:
        """Before the first paid request: is the URL right, the key accepted, the model there?

        GET /models/{model} (OpenAI and Ollama answer it: the model, or 404 `model_not_found`);
        where that route is missing, GET /models and look for the model. When the server has no
        list or does not list the model (a proxy may not), one tiny request (1 answer token)
        settles it. A wrong URL, key or model raises TeacherStop with the server's message; a busy
        server (429, 5xx) is left to the run's retries.
        """
        if not self.checked:
            asyncio.run(self._check())
            self.checked = True

    async def _check(self) -> None:
        import aiohttp

        where = f"teacher {self.model!r} at {self.shown_url}"
        async with self._session() as session:
            async def http(method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
                try:
                    status, content, _ = await asyncio.wait_for(self._send(session, method, path, body),
                                                                min(self.api.timeout_s, 30))
                    return status, content
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
                    raise TeacherStop(f"{where}: cannot reach the endpoint ({redact(str(e) or type(e).__name__)}); "
                                      "check base_url", "connection") from None

            status, content = await http("GET", f"/models/{urllib.parse.quote(self.model, safe='')}")
            if status in (401, 403):
                raise TeacherStop(f"{where}: HTTP {status} on GET /models: {error_message(content, self._key)} "
                                  "(check OPENAI_API_KEY)", f"http_{status}")
            if status == 404 and error_code(content) == "model_not_found":
                raise TeacherStop(f"{where}: HTTP 404 on GET /models/{self.model}: "
                                  f"{error_message(content, self._key)} (check the model name)", "http_404")
            if status == 200:
                return
            status, content = await http("GET", "/models")  # no such route (vLLM, llama.cpp): the models list
            if status == 200:
                try:
                    ids = {m.get("id") for m in json.loads(content).get("data", []) if isinstance(m, dict)}
                except (ValueError, AttributeError):
                    ids = set()
                if self.model in ids:
                    return
            reasoning = self.options.reasoning(self.model)
            path, body = request_body(self.model, self.prompt_form, "Say OK.", 16 if reasoning else 1, 0.0, 1.0, (),
                                      0, replace(self.options, reasoning_budget=0))
            status, content = await http("POST", path, body)
            if 400 <= status < 500 and status not in RETRYABLE_STATUS:
                hint = {401: " (check OPENAI_API_KEY)", 404: " (check base_url, model and prompt_form)"}.get(status, "")
                raise TeacherStop(f"{where}: HTTP {status} on a one-token test request to {path}: "
                                  f"{error_message(content, self._key)}{hint}", f"http_{status}")
            if status != 200:
                log(f"{where}: the test request got HTTP {status} ({error_message(content, self._key)}); going on")

    # ------------------------------------------------------------ one request, with retries

    async def _call(self, session, prompt, sampling: Sampling, seed: int):
        """One completion request. Returns (Completion, headers); raises on any error or malformed body."""
        path, body = request_body(self.model, self.prompt_form, prompt, sampling.max_new_tokens, sampling.temperature,
                                  sampling.top_p, sampling.stop, seed, self.options)
        status, content, headers = await self._send(session, "POST", path, body)
        if status >= 400:
            raise HttpStatusError(status, headers, content[:4000])
        try:
            return completion_from_body(json.loads(content), self.prompt_form), headers
        except (ValueError, KeyError, IndexError, TypeError) as e:  # invalid or truncated JSON, missing choices
            raise MalformedResponse(type(e).__name__) from e

    def _classify(self, e: Exception) -> tuple[str, bool, object, str]:
        """(error kind, retryable, response headers or None, the server's message or the exception's)."""
        import aiohttp

        if isinstance(e, MalformedResponse):
            return f"malformed:{e}", True, None, f"malformed response body ({e})"
        if isinstance(e, HttpStatusError):
            return classify_status(e.status, e.body, e.headers, self._key)
        if isinstance(e, asyncio.TimeoutError):
            return "timeout", True, None, f"no answer within timeout_s={self.api.timeout_s}"
        if isinstance(e, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return "connection", True, None, redact(str(e), self._key)[:MESSAGE_CHARS]
        return f"error:{type(e).__name__}", False, None, redact(str(e), self._key)[:MESSAGE_CHARS]

    def _answer_budget(self, sampling) -> int:
        """Output tokens one request may be billed for: the answer budget, plus reasoning for reasoning models."""
        return sampling.max_new_tokens + (self.options.reasoning_budget if self.options.reasoning(self.model) else 0)

    def _pause(self, headers) -> None:
        wait = wait_from_headers(headers)
        if wait:
            self._paused_until = max(self._paused_until, time.monotonic() + wait)

    async def _hold(self) -> None:
        while (wait := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)

    async def _one(self, session, req, sampling, seed, sem, rpm, tpm, report) -> tuple[Completion | None, str | None]:
        lim = self.api
        prompt_bytes = len(prompt_text(req.prompt).encode())
        est = self.price.cost(prompt_bytes, self._answer_budget(sampling))  # a token is at least one byte
        for attempt in range(lim.max_attempts):
            try:
                async with sem:
                    if self._fatal is not None:
                        return None, STOPPED
                    # pacing happens inside the slot, right before sending, so a pause set by
                    # another request's 429 holds every request that has not been sent yet
                    await self._hold()
                    if rpm:
                        await rpm.take(1)
                    if tpm:
                        await tpm.take(prompt_bytes // 4 + self._answer_budget(sampling))
                    await self._hold()
                    if self._fatal is not None:
                        return None, STOPPED
                    if lim.max_cost_usd and self.spent_usd + self._reserved + est > lim.max_cost_usd:
                        return None, "budget"
                    self._reserved += est
                    report.counts.add("sent")
                    try:
                        comp, headers = await self._call(session, req.prompt, sampling, seed)
                    finally:
                        self._reserved -= est
            except Exception as e:  # noqa: BLE001 - every failure is classified and counted
                kind, retryable, headers, message = self._classify(e)
                report.counts.add(f"error:{kind}")
                report.messages[kind] = message
                self._pause(headers)
                if not retryable:
                    self._stop(kind, message)
                if not retryable or attempt == lim.max_attempts - 1:
                    return None, f"{kind}: {message}"
                report.counts.add("retries")
                if not wait_from_headers(headers):
                    await asyncio.sleep(random.uniform(0, min(lim.backoff_max_s, lim.backoff_base_s * 2**attempt)))
                continue
            self._pause(headers)
            self.spent_usd += self.price.cost(comp.prompt_tokens, comp.completion_tokens)
            return comp, None
        return None, "attempts"

    def _stop(self, kind: str, message: str) -> None:
        fatal = kind in {f"http_{s}" for s in FATAL_STATUS} or kind == "http_429_insufficient_quota"
        if self._fatal is None and fatal:
            self._fatal = TeacherStop(f"teacher {self.model!r} at {self.shown_url}: {kind.replace('_', ' ', 1).upper()}"
                                      f" {message} (not retried: the stage stops here)", kind)

    # ------------------------------------------------------------ all requests

    async def _run(self, requests: list[Request], sampling: Sampling, on_done: OnDone, report: RunReport) -> None:
        lim = self.api
        sem = asyncio.Semaphore(lim.concurrency)
        rpm = TokenBucket(lim.requests_per_minute) if lim.requests_per_minute else None
        tpm = (TokenBucket(lim.tokens_per_minute, min_capacity=self._answer_budget(sampling) * 4)
               if lim.tokens_per_minute else None)
        queue: asyncio.Queue = asyncio.Queue()
        for req in requests:
            queue.put_nowait(req)

        async def worker(session):
            while not queue.empty():
                req = queue.get_nowait()
                if self._fatal is not None:
                    report.counts.add("not_sent")
                    continue
                comp, failure = await self._one(session, req, sampling, sampling.seed + req.draw, sem, rpm, tpm,
                                                report)
                if failure == STOPPED:
                    report.counts.add("not_sent")
                    continue
                on_done(req, comp, failure)

        # a few more workers than the concurrency cap, so slots free up while others back off
        async with self._session() as session:
            await asyncio.gather(*(worker(session) for _ in range(min(len(requests), lim.concurrency * 2))))

    def run(self, requests: list[Request], sampling: Sampling, on_done: OnDone, report: RunReport) -> None:
        try:  # uvloop's event loop, where installed, halves the loop's own overhead
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        self._paused_until, self._reserved, self._fatal = 0.0, 0.0, None
        gc.freeze()  # the request list and loaded modules need no scanning by every collection
        try:
            runner(self._run(requests, sampling, on_done, report))
        finally:
            gc.unfreeze()
        if self._fatal is not None:
            if report.counts["not_sent"]:
                n = report.counts["not_sent"]
                self._fatal.args = (f"{self._fatal.args[0]}; {n} queued requests were not sent",)
            raise self._fatal
