"""The OpenAI wire format, for the online client and the Batch API alike (curator's `openai_request_mixin`):
the request body per model family (`RequestOptions`, `request_body`), the response body as a
`Completion`, the server's error text with any key redacted, how an HTTP status is classified
(retried, fatal for the run, or about one prompt only) and the rate-limit headers.

Reasoning models (the o-series, gpt-5) get `max_completion_tokens` and no sampling params (OpenAI
answers 400 to `max_tokens` and to a non-default `temperature` for them); extra body fields
(`reasoning_effort`, vLLM's `top_k`) are added as given. A prompt is a string (one user message) or
a (system, user) pair.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field

from stages.lib.errors import StageError, check
from stages.lib.llm.types import Completion, chat_messages, prompt_text, split_reasoning

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
# the request itself is wrong (parameter, key, permission, URL or model): the next request will fail the same way
FATAL_STATUS = {400, 401, 403, 404}
# ... except these, which are about one request's content (a too-long prompt, a refused prompt)
PER_REQUEST_CODES = {"context_length_exceeded", "content_filter", "invalid_prompt", "string_above_max_length"}
MESSAGE_CHARS = 300
DEFAULT_BASE_URL = "https://api.openai.com/v1"


# ---------------------------------------------------------------- requests

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


def request_body(model: str, prompt_form: str, prompt, max_tokens: int, temperature: float, top_p: float,
                 stop, seed: int, options: RequestOptions | None = None) -> tuple[str, dict]:
    """(path under the base URL, JSON body) of one Chat Completions / Completions request.

    The one place a request is built: the online client and the Batch API send this.
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


# ---------------------------------------------------------------- responses


def completion_from_body(body: dict, prompt_form: str) -> Completion:
    """A Chat Completions / Completions response body as a Completion, its reasoning trace (a `reasoning` or
    `reasoning_content` field, `<think>` tags) split from the answer by `types.split_reasoning`. A body of
    another shape (a missing or non-list `choices`, a non-string `content` or reasoning field, non-integer token
    counts) raises ValueError, KeyError, IndexError or TypeError, never another exception."""
    try:
        choice = body["choices"][0]
        message = choice["message"] if prompt_form == "chat" else None
        text = (message["content"] if message is not None else choice["text"]) or ""
        usage = body.get("usage") or {}
        details = usage.get("completion_tokens_details") or {}
        reasoning = int(details.get("reasoning_tokens") or 0)
        finish = choice.get("finish_reason") or "stop"
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
    except AttributeError as e:  # a list or a string where an object belongs
        raise TypeError(str(e)) from None
    if not isinstance(text, str) or not isinstance(finish, str):
        raise TypeError("content and finish_reason must be strings")
    trace = split_reasoning(text, message)  # the one place a trace is read: every provider form
    # OpenAI counts reasoning tokens inside completion_tokens (and bills them as output); never count fewer.
    # `model` is the exact snapshot served, e.g. gpt-4o-mini-2024-07-18
    served, fingerprint, rid = (v if isinstance(v, str) else None
                                for v in (body.get("model"), body.get("system_fingerprint"), body.get("id")))
    return Completion(trace.answer, finish, prompt_tokens, max(completion_tokens, reasoning),
                      reasoning_tokens=reasoning, response_id=rid, served_model=served, system_fingerprint=fingerprint,
                      reasoning=trace.reasoning, reasoning_source=trace.source)


# ---------------------------------------------------------------- errors

_KEYLIKE = re.compile(r"\b(sk-|sk_|Bearer\s+)[A-Za-z0-9_\-*.]{6,}")
_URL_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
_URL_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#]*)\?[^\s#\"')]*")
_SECRETS: set[str] = set()


def remember_secret(secret: str) -> None:
    """Make `redact` remove `secret` (the stripped API key) from every message from now on."""
    if secret and len(secret) >= 4:
        _SECRETS.add(secret)


def api_key_from_env(required: bool) -> str | None:
    """OPENAI_API_KEY stripped of surrounding whitespace (a trailing newline from a secret file), and
    remembered by `redact`; None when unset and not `required`. A key with whitespace or control
    characters inside is refused with a message that does not quote it."""
    key = (os.environ.get("OPENAI_API_KEY") or "").strip()
    if not key:
        if required:
            raise StageError("backend openai: OPENAI_API_KEY is not set (or empty); set it in the environment "
                             "(never in params.yaml)")
        return None
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in key):
        raise StageError(f"backend openai: OPENAI_API_KEY ({len(key)} characters) holds whitespace or control "
                         "characters inside it; set it to the key alone")
    remember_secret(key)
    return key


def public_url(url: str | None) -> str:
    """`url` fit to quote: no `user:pass@`, no query string."""
    return redact(url or "")


def endpoint_of(url: str | None) -> str:
    """The endpoint an answer came from, as recorded with it: scheme, host, port and path of `url`
    (the default: OpenAI's), without credentials or query string."""
    u = urllib.parse.urlsplit((url or DEFAULT_BASE_URL).strip())
    port = f":{u.port}" if u.port else ""
    return f"{u.scheme.lower()}://{(u.hostname or '').lower()}{port}{u.path.rstrip('/')}"


def online_teacher_id(model: str, endpoint: str) -> str:
    """The cache identity of `model` at `endpoint`: `openai:<model>` at OpenAI's own endpoint (the keys of
    earlier versions), `openai:<model>@<endpoint>` anywhere else, so two servers that both call their
    model `default` never share answers (a declared `teacher_id` shares them on purpose)."""
    return f"openai:{model}" if endpoint == endpoint_of(None) else f"openai:{model}@{endpoint}"


def redact(text: str, key: str | None = None) -> str:
    """The one redaction of every message that is written or logged: `text` without the API key (as
    given and as remembered, stripped), anything that looks like a key, and a URL's credentials and
    query string."""
    for secret in sorted(_SECRETS | ({key, key.strip()} if key else set()), key=len, reverse=True):
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    text = _URL_CREDENTIALS.sub(lambda m: m.group(1) + "[redacted]@", text)
    text = _URL_QUERY.sub(lambda m: m.group(1) + "?[redacted]", text)
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


def classify_status(status: int, content, headers, key: str | None = None) -> tuple[str, bool, object, str]:
    """(error kind, retryable, headers, the server's message) of an HTTP error answer."""
    if isinstance(content, dict) and "error" not in content:
        content = {"error": content}  # a Batch error line holds the inner error object
    message, code = error_message(content, key), error_code(content)
    if status == 429 and code == "insufficient_quota":  # no retry will help: treat as fatal
        return "http_429_insufficient_quota", False, headers, message
    if status in FATAL_STATUS and code in PER_REQUEST_CODES:  # about this prompt only: fail it, go on
        return f"http_{status}_{code}", False, headers, message
    return f"http_{status}", status in RETRYABLE_STATUS or status >= 500, headers, message


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


class MalformedResponse(Exception):
    pass


class HttpStatusError(Exception):
    def __init__(self, status: int, headers, body: bytes):
        super().__init__(f"HTTP {status}: {error_message(body)}")
        self.status, self.headers, self.body = status, headers, body
