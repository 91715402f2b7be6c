"""Async client for OpenAI-compatible endpoints: concurrency cap, token buckets, retries, budget.

`ApiTeacher.run(requests, sampling, on_done)` sends every request at most `concurrency`
at a time, paced by requests-per-minute and tokens-per-minute token buckets and paused
globally by `Retry-After` / `x-ratelimit-*` headers. 429, 5xx, timeouts, dropped
connections and malformed bodies are retried with exponential back-off and full jitter
up to `max_attempts`; then the request is reported as failed with its reason (the next
run retries it). A budget, when set, is checked before each request is sent, using a
worst-case estimate (prompt bytes as tokens plus `max_tokens`), so it is never exceeded.
`on_done(request, completion | None, failure_reason | None)` is called as each request
finishes, so the caller can make every paid response durable at once.

Requests are built by one function, `request_body`, for both this client and the Batch API,
per model family (`RequestOptions`): reasoning models (the o-series, gpt-5) get
`max_completion_tokens` and no sampling params (OpenAI answers 400 to `max_tokens` and to a
non-default `temperature` for them); extra body fields (`reasoning_effort`, vLLM's `top_k`)
are added as given. A prompt is a string (one user message) or a (system, user) pair.

Errors keep the server's message (truncated, any key redacted). 400, 401, 403 and 404 say
the request itself is wrong (bad parameter, key, URL or model): such an error stops the run
at once (`TeacherStop`), no request still queued is sent. `check_endpoint` asks the models
list (or sends one tiny request) before the first paid request, so a wrong URL, key or model
name fails in a second with the server's own words.

Two transports, the same requests and responses:
- `direct` (default): aiohttp posts the Chat Completions / Completions JSON straight to the
  endpoint. Measured here (2 cores, loopback, C=64, 100 ms latency): 90-92% of the C / L
  bound, 3,600-4,000 requests/s at zero latency;
- `sdk`: the same call through the `openai` package's async client (on its aiohttp
  transport). Its request building costs about 1 ms of CPU per request: 86% of the bound,
  about 950 requests/s at zero latency.
The Batch API (`stages/openai_batch.py`) always uses the `openai` package.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field, replace
from typing import Callable

from stages.lib.errors import StageError, check
from stages.lib.progress import log
from stages.lib.llm.local import Completion

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
# the request itself is wrong (parameter, key, permission, URL or model): the next request will fail the same way
FATAL_STATUS = {400, 401, 403, 404}
# ... except these, which are about one request's content (a too-long prompt, a refused prompt)
PER_REQUEST_CODES = {"context_length_exceeded", "content_filter", "invalid_prompt", "string_above_max_length"}
MESSAGE_CHARS = 300
STOPPED = "stopped"  # the run stopped on a fatal error before this request was sent
DEFAULT_BASE_URL = "https://api.openai.com/v1"
RAW_HEADER = "X-Stainless-Raw-Response"  # makes the openai client hand back the HTTP response as is


@dataclass
class Price:
    input_per_million: float = 0.0
    output_per_million: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / 1e6


@dataclass
class ApiLimits:
    concurrency: int = 16
    requests_per_minute: float = 0.0  # 0: no limit
    tokens_per_minute: float = 0.0  # 0: no limit
    max_attempts: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 120.0
    max_cost_usd: float = 0.0  # 0: no budget
    transport: str = "direct"  # "direct": aiohttp straight to the endpoint; "sdk": through the openai client


# ---------------------------------------------------------------- building requests

REASONING_MODEL = re.compile(r"^(o\d+(-.*)?|gpt-5.*)$")
FAMILIES = ("auto", "standard", "reasoning")
RESERVED_BODY_KEYS = {"model", "messages", "prompt", "stream"}


def is_reasoning_model(model: str) -> bool:
    """o1, o3, o3-mini, o4-mini, gpt-5, gpt-5.x-... (a provider prefix such as `openai/` is ignored)."""
    return bool(REASONING_MODEL.match(model.rsplit("/", 1)[-1].lower()))


@dataclass
class RequestOptions:
    """How requests to one model are built beyond the prompt and the sampling params."""

    model_family: str = "auto"
    """`auto` (from the model name: o1/o3/o4-mini/gpt-5... are reasoning models), `standard` or `reasoning`.
    Reasoning models get `max_completion_tokens` and no temperature, top_p or stop."""
    extra_body: dict = field(default_factory=dict)
    """Extra request body fields, sent as given: e.g. {reasoning_effort: low} (OpenAI reasoning models),
    {top_k: 20, min_p: 0.05} (vLLM), provider routing for a proxy. Part of the cache key."""
    reasoning_budget: int = 1024
    """Reasoning models: tokens allowed for hidden reasoning, added to each request's answer budget
    (`max_completion_tokens` = max_new_tokens + this). They are billed as output tokens."""

    def __post_init__(self):
        check(self.model_family in FAMILIES, f"model_family: expected one of {FAMILIES}, got {self.model_family!r}")
        check(isinstance(self.extra_body, dict), "extra_body: expected a mapping of request body fields")
        bad = sorted(RESERVED_BODY_KEYS & set(self.extra_body))
        check(not bad, f"extra_body: {bad} cannot be overridden (they come from model and the prompt)")
        check(self.reasoning_budget >= 0, "reasoning_budget: must be >= 0")

    def reasoning(self, model: str) -> bool:
        return self.model_family == "reasoning" or (self.model_family == "auto" and is_reasoning_model(model))

    def fields(self, model: str) -> dict:
        """What these options add to a request's cache key (`request_fields`): nothing for the defaults."""
        out: dict = {}
        if self.extra_body:
            out["extra_body"] = self.extra_body
        if self.reasoning(model):
            out["reasoning_budget"] = self.reasoning_budget
        return out


def chat_messages(prompt) -> list[dict]:
    """A prompt as Chat Completions messages: a string is one user message, a (system, user) pair two."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    system, user = prompt
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def prompt_text(prompt) -> str:
    """A prompt as one string (completion form, hashing): a (system, user) pair joined by a blank line."""
    return prompt if isinstance(prompt, str) else "\n\n".join(p for p in prompt if p)


def request_body(model: str, prompt_form: str, prompt, max_tokens: int, temperature: float, top_p: float,
                 stop, seed: int, options: RequestOptions | None = None) -> tuple[str, dict]:
    """(path under the base URL, JSON body) of one Chat Completions / Completions request.

    The one place a request is built: the direct and sdk transports and the Batch API send this.
    """
    o = options or RequestOptions()
    body: dict = {"model": model}
    if o.reasoning(model):
        # OpenAI: reasoning models reject `max_tokens` ("Use 'max_completion_tokens' instead") and any
        # non-default temperature/top_p with 400; stop sequences are left out with them
        body["max_completion_tokens"] = max_tokens + o.reasoning_budget
    else:
        body.update(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
        if stop:
            body["stop"] = list(stop)
    body["seed"] = seed
    body.update(o.extra_body)
    if prompt_form == "chat":
        return "/chat/completions", {**body, "messages": chat_messages(prompt)}
    return "/completions", {**body, "prompt": prompt_text(prompt)}


# ---------------------------------------------------------------- errors

_KEYLIKE = re.compile(r"\b(sk-|sk_|Bearer\s+)[A-Za-z0-9_\-*.]{6,}")


def redact(text: str, key: str | None = None) -> str:
    """`text` with the API key and anything that looks like one replaced."""
    if key and len(key) >= 4:
        text = text.replace(key, "[redacted]")
    return _KEYLIKE.sub(lambda m: m.group(1) + "[redacted]", text)


def error_message(content: bytes | str | dict | None, key: str | None = None) -> str:
    """The server's error message (OpenAI's `{"error": {"message": ...}}` or the raw body), one line,
    truncated to MESSAGE_CHARS, keys redacted."""
    msg = content
    if isinstance(msg, (bytes, bytearray)):
        msg = msg.decode("utf-8", "replace")
    if isinstance(msg, str):
        try:
            msg = json.loads(msg)
        except ValueError:
            pass
    if isinstance(msg, dict):
        err = msg.get("error", msg)
        msg = err.get("message") or json.dumps(err) if isinstance(err, dict) else str(err)
    text = re.sub(r"\s+", " ", str(msg or "")).strip()
    text = redact(text, key)
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


def error_code(content) -> str | None:
    try:
        err = json.loads(content).get("error") if isinstance(content, (bytes, str)) else (content or {}).get("error")
        return err.get("code") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        return None


class TeacherStop(StageError):
    """A fatal error (400/401/403/404): the run stopped, nothing queued after it was sent."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


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


def parse_duration(value: str | None) -> float | None:
    """'1.5' (seconds), '20ms', '6m0s', '1h2m3.5s' -> seconds."""
    if not value:
        return None
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    total, found = 0.0, False
    for num, unit in re.findall(r"([\d.]+)(ms|h|m|s)", value):
        found = True
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total if found else None


def wait_from_headers(headers) -> float | None:
    """Seconds to hold all requests, from Retry-After(-ms) or exhausted x-ratelimit-* headers."""
    if headers is None:
        return None
    if headers.get("retry-after-ms"):
        return float(headers["retry-after-ms"]) / 1000
    if headers.get("retry-after"):
        return parse_duration(headers["retry-after"])
    waits = []
    for kind in ("requests", "tokens"):
        if headers.get(f"x-ratelimit-remaining-{kind}") in ("0", "0.0"):
            waits.append(parse_duration(headers.get(f"x-ratelimit-reset-{kind}")) or 1.0)
    return max(waits) if waits else None


@dataclass
class ApiStats:
    sent: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    errors: dict = field(default_factory=dict)  # retried or final errors by kind
    messages: dict = field(default_factory=dict)  # the server's last message by error kind
    not_sent: int = 0  # requests left unsent because a fatal error stopped the run


def completion_from_body(body: dict, prompt_form: str) -> Completion:
    """A Chat Completions / Completions response body as a Completion (KeyError etc. when malformed)."""
    choice = body["choices"][0]
    text = (choice["message"]["content"] if prompt_form == "chat" else choice["text"]) or ""
    usage = body.get("usage") or {}
    reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    # OpenAI counts reasoning tokens inside completion_tokens (and bills them as output); never count fewer
    comp = Completion(text, choice.get("finish_reason") or "stop", int(usage.get("prompt_tokens") or 0),
                      max(int(usage.get("completion_tokens") or 0), reasoning))
    comp.response_id = body.get("id")  # type: ignore[attr-defined]
    comp.served_model = body.get("model")  # type: ignore[attr-defined]  # the exact snapshot, e.g. gpt-4o-mini-2024-07-18
    comp.system_fingerprint = body.get("system_fingerprint")  # type: ignore[attr-defined]
    comp.reasoning_tokens = reasoning  # type: ignore[attr-defined]
    return comp


class ApiTeacher:
    def __init__(self, model: str, base_url: str | None, prompt_form: str, api_key: str, limits: ApiLimits,
                 price: Price | None = None, options: RequestOptions | None = None):
        self._key = api_key
        # params.yaml is the only source of the endpoint: it is part of every cache key
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.model, self.prompt_form, self.limits = model, prompt_form, limits
        self.options = options or RequestOptions()
        self.price = price or Price()
        self.stats = ApiStats()
        self.paused_until = 0.0
        self.reserved = 0.0
        self.fatal: TeacherStop | None = None
        self.checked = False

    # ------------------------------------------------------------ the endpoint check

    def _http(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        """One synchronous request (status, body); (0, reason) when the server cannot be reached."""
        headers = {"Authorization": f"Bearer {self._key}", "Content-Type": "application/json"}
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=min(self.limits.timeout_s, 30)) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            return 0, str(getattr(e, "reason", e)).encode()

    def check_endpoint(self) -> None:
        """Before the first paid request: is the URL right, the key accepted, the model there?

        GET /models/{model} (OpenAI and Ollama answer it: the model, or 404 `model_not_found`);
        where that route is missing, GET /models and look for the model. When the server has no
        list or does not list the model (a proxy may not), one tiny request (1 answer token)
        settles it.
        A wrong URL, key or model raises TeacherStop with the server's message; a busy server
        (429, 5xx) is left to the run's retries.
        """
        if self.checked:
            return
        where = f"teacher {self.model!r} at {self.base_url}"
        # GET /models/{model} (OpenAI, Ollama): 200 when it is there, 404 `model_not_found` when it is not
        status, content = self._http("GET", f"/models/{urllib.parse.quote(self.model, safe='')}")
        if status == 0:
            raise TeacherStop(f"{where}: cannot reach the endpoint ({content.decode(errors='replace')}); "
                              "check base_url", "connection")
        if status in (401, 403):
            raise TeacherStop(f"{where}: HTTP {status} on GET /models: {error_message(content, self._key)} "
                              "(check OPENAI_API_KEY)", f"http_{status}")
        if status == 404 and error_code(content) == "model_not_found":
            raise TeacherStop(f"{where}: HTTP 404 on GET /models/{self.model}: {error_message(content, self._key)} "
                              "(check the model name)", "http_404")
        if status == 200:
            self.checked = True
            return
        # no such route (vLLM, llama.cpp): the models list
        status, content = self._http("GET", "/models")
        if status == 200:
            try:
                ids = {m.get("id") for m in json.loads(content).get("data", []) if isinstance(m, dict)}
            except (ValueError, AttributeError):
                ids = set()
            if self.model in ids:
                self.checked = True
                return
        reasoning = self.options.reasoning(self.model)
        path, body = request_body(self.model, self.prompt_form, "Say OK.", 16 if reasoning else 1, 0.0, 1.0, (), 0,
                                  replace(self.options, reasoning_budget=0))
        status, content = self._http("POST", path, body)
        if status == 0:
            raise TeacherStop(f"{where}: cannot reach the endpoint ({content.decode(errors='replace')}); "
                              "check base_url", "connection")
        if 400 <= status < 500 and status not in RETRYABLE_STATUS:
            hint = {401: " (check OPENAI_API_KEY)", 404: " (check base_url, model and prompt_form)"}.get(status, "")
            raise TeacherStop(f"{where}: HTTP {status} on a one-token test request to {path}: "
                              f"{error_message(content, self._key)}{hint}", f"http_{status}")
        if status != 200:
            log(f"{where}: the test request got HTTP {status} ({error_message(content, self._key)}); going on")
        self.checked = True

    # ------------------------------------------------------------ one call

    def _request(self, prompt, max_tokens: int, temperature: float, top_p: float, stop, seed: int):
        return request_body(self.model, self.prompt_form, prompt, max_tokens, temperature, top_p, stop, seed,
                            self.options)

    async def _send_direct(self, path: str, body: dict):
        async with self.session.post(self.base_url + path, data=json.dumps(body)) as r:
            content = await r.read()
            if r.status >= 400:
                raise HttpStatusError(r.status, r.headers, content[:4000])
            return content, r.headers

    async def _send_sdk(self, path: str, body: dict):
        raw = await self.client.post(path, body=body, cast_to=object, options={"headers": {RAW_HEADER: "true"}})
        return raw.http_response.content, raw.http_response.headers

    async def _call(self, prompt, max_tokens: int, temperature: float, top_p: float, stop, seed: int):
        """One HTTP request. Returns (Completion, headers); raises on any error or malformed body.

        Both transports parse the body with `json`: the openai client's response models
        and request transformation cost more CPU per request than everything else here.
        """
        path, body = self._request(prompt, max_tokens, temperature, top_p, stop, seed)
        send = self._send_direct if self.limits.transport == "direct" else self._send_sdk
        content, headers = await send(path, body)
        try:
            return completion_from_body(json.loads(content), self.prompt_form), headers
        except (ValueError, KeyError, IndexError, TypeError) as e:  # invalid or truncated JSON, missing choices
            raise MalformedResponse(type(e).__name__) from e

    def _classify(self, e: Exception) -> tuple[str, bool, object, str]:
        """(error kind, retryable, response headers or None, the server's message or the exception's)."""
        import aiohttp
        import openai

        if isinstance(e, MalformedResponse):
            return f"malformed:{e}", True, None, f"malformed response body ({e})"
        if isinstance(e, HttpStatusError):
            return self._status(e.status, e.body, e.headers)
        if isinstance(e, asyncio.TimeoutError):
            return "timeout", True, None, f"no answer within timeout_s={self.limits.timeout_s}"
        if isinstance(e, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return "connection", True, None, redact(str(e), self._key)[:MESSAGE_CHARS]
        if isinstance(e, openai.APITimeoutError):
            return "timeout", True, None, f"no answer within timeout_s={self.limits.timeout_s}"
        if isinstance(e, openai.APIConnectionError):
            return "connection", True, None, redact(str(e), self._key)[:MESSAGE_CHARS]
        if isinstance(e, openai.APIStatusError):
            return self._status(e.status_code, e.body if e.body is not None else e.response.content, e.response.headers)
        if isinstance(e, (openai.APIResponseValidationError, ValueError)):
            return f"malformed:{type(e).__name__}", True, None, f"malformed response body ({type(e).__name__})"
        return f"error:{type(e).__name__}", False, None, redact(str(e), self._key)[:MESSAGE_CHARS]

    def _status(self, status: int, content, headers) -> tuple[str, bool, object, str]:
        if isinstance(content, dict) and "error" not in content:
            content = {"error": content}  # the openai client hands back the inner error object
        message, code = error_message(content, self._key), error_code(content)
        if status == 429 and code == "insufficient_quota":  # no retry will help: treat as fatal
            return "http_429_insufficient_quota", False, headers, message
        if status in FATAL_STATUS and code in PER_REQUEST_CODES:  # about this prompt only: fail it, go on
            return f"http_{status}_{code}", False, headers, message
        return f"http_{status}", status in RETRYABLE_STATUS or status >= 500, headers, message

    def _stop(self, kind: str, message: str) -> None:
        if self.fatal is None and (kind in {f"http_{s}" for s in FATAL_STATUS} or kind == "http_429_insufficient_quota"):
            self.fatal = TeacherStop(f"teacher {self.model!r} at {self.base_url}: {kind.replace('_', ' ', 1).upper()}"
                                     f" {message} (not retried: the stage stops here)", kind)

    # ------------------------------------------------------------ one request, with retries

    def _answer_budget(self, sampling) -> int:
        """Output tokens one request may be billed for: the answer budget, plus reasoning for reasoning models."""
        return sampling.max_new_tokens + (self.options.reasoning_budget if self.options.reasoning(self.model) else 0)

    async def _one(self, req, sampling, seed: int, sem, rpm, tpm) -> tuple[Completion | None, str | None]:
        lim = self.limits
        prompt_bytes = len(prompt_text(req.prompt).encode())
        for attempt in range(lim.max_attempts):
            est = self.price.cost(prompt_bytes, self._answer_budget(sampling))  # a token is at least one byte
            try:
                async with sem:
                    if self.fatal is not None:
                        return None, STOPPED
                    # pacing happens inside the slot, right before sending, so a pause set by
                    # another request's 429 holds every request that has not been sent yet
                    if self.paused_until > time.monotonic():
                        await self._hold()
                    if rpm:
                        await rpm.take(1)
                    if tpm:
                        await tpm.take(prompt_bytes // 4 + self._answer_budget(sampling))
                    if self.paused_until > time.monotonic():
                        await self._hold()
                    if self.fatal is not None:
                        return None, STOPPED
                    if lim.max_cost_usd and self.stats.cost_usd + self.reserved + est > lim.max_cost_usd:
                        return None, "budget"
                    self.reserved += est
                    self.stats.sent += 1
                    try:
                        comp, headers = await self._call(req.prompt, sampling.max_new_tokens, sampling.temperature,
                                                         sampling.top_p, sampling.stop, seed)
                    finally:
                        self.reserved -= est
            except Exception as e:  # noqa: BLE001 - every failure is classified and counted
                kind, retryable, headers, message = self._classify(e)
                self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1
                self.stats.messages[kind] = message
                wait = wait_from_headers(headers)
                if wait:
                    self.paused_until = max(self.paused_until, time.monotonic() + wait)
                if not retryable:
                    self._stop(kind, message)
                if not retryable or attempt == lim.max_attempts - 1:
                    return None, f"{kind}: {message}"
                self.stats.retries += 1
                if not wait:
                    await asyncio.sleep(random.uniform(0, min(lim.backoff_max_s, lim.backoff_base_s * 2**attempt)))
                continue
            wait = wait_from_headers(headers)
            if wait:
                self.paused_until = max(self.paused_until, time.monotonic() + wait)
            self.stats.prompt_tokens += comp.prompt_tokens
            self.stats.completion_tokens += comp.completion_tokens
            self.stats.reasoning_tokens += getattr(comp, "reasoning_tokens", 0)
            self.stats.cost_usd += self.price.cost(comp.prompt_tokens, comp.completion_tokens)
            return comp, None
        return None, "attempts"

    async def _hold(self) -> None:
        while (wait := self.paused_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)

    # ------------------------------------------------------------ all requests

    def _open(self) -> None:
        """Open the transport inside the running event loop."""
        if self.limits.transport == "direct":
            import aiohttp

            headers = {"Authorization": f"Bearer {self._key}", "Content-Type": "application/json"}
            for env, header in (("OPENAI_ORG_ID", "OpenAI-Organization"), ("OPENAI_PROJECT_ID", "OpenAI-Project")):
                if os.environ.get(env):
                    headers[header] = os.environ[env]
            self.session = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=self.limits.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.limits.concurrency))
        else:
            import openai

            kw = dict(api_key=self._key, base_url=self.base_url, max_retries=0, timeout=self.limits.timeout_s)
            try:
                self.client = openai.AsyncOpenAI(**kw, http_client=openai.DefaultAioHttpClient())
            except RuntimeError:  # aiohttp not installed
                self.client = openai.AsyncOpenAI(**kw)

    async def _close(self) -> None:
        await (self.session.close() if self.limits.transport == "direct" else self.client.close())

    async def _run(self, requests, sampling, seeds, on_done: Callable) -> None:
        self._open()
        lim = self.limits
        sem = asyncio.Semaphore(lim.concurrency)
        rpm = TokenBucket(lim.requests_per_minute) if lim.requests_per_minute else None
        tpm = TokenBucket(lim.tokens_per_minute, min_capacity=self._answer_budget(sampling) * 4) if lim.tokens_per_minute else None
        queue: asyncio.Queue = asyncio.Queue()
        for item in zip(requests, seeds):
            queue.put_nowait(item)

        async def worker():
            while not queue.empty():
                req, seed = queue.get_nowait()
                if self.fatal is not None:
                    self.stats.not_sent += 1
                    continue
                comp, failure = await self._one(req, sampling, seed, sem, rpm, tpm)
                if failure == STOPPED:
                    self.stats.not_sent += 1
                    continue
                on_done(req, comp, failure)

        # a few more workers than the concurrency cap, so slots free up while others back off
        try:
            await asyncio.gather(*(worker() for _ in range(min(len(requests), lim.concurrency * 2))))
        finally:
            await self._close()

    def run(self, requests, sampling, seeds: list[int], on_done: Callable) -> ApiStats:
        try:  # uvloop's event loop, where installed, halves the loop's own overhead
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        gc.freeze()  # the request list and loaded modules need no scanning by every collection
        try:
            runner(self._run(requests, sampling, seeds, on_done))
        finally:
            gc.unfreeze()
        if self.fatal is not None:
            if self.stats.not_sent:
                self.fatal.args = (f"{self.fatal.args[0]}; {self.stats.not_sent} queued requests were not sent",)
            raise self.fatal
        return self.stats


class MalformedResponse(Exception):
    pass


class HttpStatusError(Exception):
    def __init__(self, status: int, headers, body: bytes):
        super().__init__(f"HTTP {status}: {error_message(body)}")
        self.status, self.headers, self.body = status, headers, body
