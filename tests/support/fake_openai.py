"""A small, fast, stdlib-only OpenAI-compatible HTTP/1.1 server on loopback, for tests and benchmarks.

It runs an asyncio server in a background thread with its own event loop, bound only to 127.0.0.1 on an
ephemeral port, speaks HTTP/1.1 with keep-alive and serves (under /v1):

- POST /chat/completions, POST /completions: canned answers, with optional latency and injected faults;
- POST /files (multipart upload), GET /files/{id}, GET /files/{id}/content, DELETE /files/{id};
- POST /batches, GET /batches/{id}, POST /batches/{id}/cancel: enough of the Batch API for the openai SDK.

    with FakeOpenAI(latency=0.01, faults={3: "429"}) as srv:
        client = AsyncOpenAI(api_key="test", base_url=srv.base_url, max_retries=0)

Strict mode (`FakeOpenAI.strict(...)`, or the arguments one by one) behaves as the real OpenAI API does,
as reported in ../shared/reference/real-endpoint-behaviour.md (the messages are OpenAI's own):
- `chat_only`: a chat model on POST /v1/completions gets 404 "This is a chat model and not supported in
  the v1/completions endpoint..." (tmc/langchaingo#201, hegelai/prompttools#115); a legacy completion model
  (gpt-3.5-turbo-instruct, davinci-002, babbage-002) on /v1/chat/completions gets 404 "This is not a chat
  model..." (run-llama/llama_index#1332);
- reasoning-model names (o1, o3, o3-mini, o4-mini, gpt-5...), always: `max_tokens` -> 400
  `unsupported_parameter` ("Use 'max_completion_tokens' instead", teilomillet/gollm#33); a temperature or
  top_p other than 1 -> 400 `unsupported_value` ("Only the default (1) value is supported."); their usage
  reports `completion_tokens_details.reasoning_tokens` (inside completion_tokens, billed as output);
- `models`: GET /v1/models lists them and GET /v1/models/{id} retrieves one; any other model name gets
  404 `model_not_found` ("The model `X` does not exist or you do not have access to it."). None: every
  name is served, GET /v1/models/{id} answers for any name and GET /v1/models is 404; in strict mode
  both are 404 then (a server without a models API, as the chat-only test server);
- `api_key`: any other bearer token gets 401 "Incorrect API key provided: sk-abc***...wxyz" (the key shown
  masked, as OpenAI does);
- `served_suffix` / `system_fingerprint`: the response's `model` names the snapshot served
  (gpt-4o-mini -> gpt-4o-mini-2024-07-18) and `system_fingerprint` the backend configuration.

Reasoning traces (`reasoning_form`, one per provider form; `trace(body)` is the thinking text, `reply(body)`
the answer; ../shared/reference/anchors-distillation-2026.md §1.2). The trace's tokens (one per word) are
added to `completion_tokens`, as every one of these servers bills them as output:
- `reasoning_content`: DeepSeek's API (`FakeOpenAI.deepseek()`): `message.reasoning_content` beside
  `message.content`, usage with `completion_tokens_details.reasoning_tokens`. As DeepSeek's reasoning-model
  guide says: `temperature`, `top_p`, `presence_penalty` and `frequency_penalty` are accepted and have no
  effect; `logprobs` / `top_logprobs` get HTTP 400, and so does a `reasoning_content` field in the input
  messages (the error body is DeepSeek's shape, as reported in lollipopkit/flutter_gpt_box#213: "deepseek-reasoner
  does not support the parameter `presence_penalty`", type and code `invalid_request_error`, param null);
- `reasoning`: vLLM with `--reasoning-parser` since PR #27752 renamed the field and PR #33402 (Jan 2026)
  removed `reasoning_content` (`FakeOpenAI.vllm_reasoning()`): `message.reasoning`, no `reasoning_content`
  key at all; OpenRouter sends the same field;
- `think_tags`: `<think>trace</think>answer` inline in the content (a server with no reasoning parser, Fireworks);
- `prefilled_think`: `trace</think>answer`, as from an R1 chat template that prefilled `<think>` (vllm #13125).
On /v1/completions no server parses the trace: the text is `<think>trace</think>answer` for every form.
Fault "no_trace" answers without the trace (a lost trace: the parser off, the field renamed).

Fault kinds (per completion request n, counting from 0 over all /chat/completions and /completions requests):
"429", "500", "503", "timeout", "invalid_json", "truncated_json", "drop", "missing_choices",
"empty_content", "length", "no_trace". Batch lines are answered with `reply` and never get faults (use `batch_fail`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any, Callable

__all__ = ["FakeOpenAI", "FAULT_KINDS"]

FAULT_KINDS = ("429", "500", "503", "timeout", "invalid_json", "truncated_json", "drop", "missing_choices",
               "empty_content", "length", "no_trace")
REASONING_FORMS = ("reasoning_content", "reasoning", "think_tags", "prefilled_think")
DEEPSEEK_NO_EFFECT = ("temperature", "top_p", "presence_penalty", "frequency_penalty")  # accepted, ignored
DEEPSEEK_REFUSED = ("logprobs", "top_logprobs")  # HTTP 400

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}
_JSON = "application/json"
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return _dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


LEGACY_COMPLETION_MODELS = ("gpt-3.5-turbo-instruct", "davinci-002", "babbage-002")
CHAT_MODEL_ON_COMPLETIONS = ("This is a chat model and not supported in the v1/completions endpoint. "
                             "Did you mean to use v1/chat/completions?")
NOT_A_CHAT_MODEL = ("This is not a chat model and thus not supported in the v1/chat/completions endpoint. "
                    "Did you mean to use v1/completions?")


def is_reasoning_model(model: str) -> bool:
    """o1, o3, o3-mini, o4-mini, gpt-5, gpt-5.4-...: the names OpenAI's reasoning-model rules apply to."""
    import re

    return bool(re.match(r"^(o\d+(-.*)?|gpt-5.*)$", str(model).rsplit("/", 1)[-1].lower()))


def _last_user_text(body: dict) -> str:
    """The last user message's text (chat) or the prompt (completions), as a string."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                content = m.get("content")
                if isinstance(content, list):  # content parts
                    content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
                return content if isinstance(content, str) else str(content)
        return ""
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    return prompt if isinstance(prompt, str) else str(prompt)


def default_reply(body: dict) -> str:
    return "answer to: " + _last_user_text(body)[:40]


def default_trace(body: dict) -> str:
    return "Okay, let me think. The question is: " + _last_user_text(body)[:40] + "\nWait, check it again. Yes."


def _parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """Split a multipart/form-data body into (fields, files); files map name -> (filename, content)."""
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise ValueError("multipart body without a boundary")
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    delim = b"--" + boundary.encode("latin-1")
    for part in body.split(delim)[1:]:
        if part.startswith(b"--"):  # closing delimiter
            break
        if part.startswith(b"\r\n"):
            part = part[2:]
        if part.endswith(b"\r\n"):
            part = part[:-2]
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        name = filename = None
        for line in head.decode("utf-8", "replace").split("\r\n"):
            hname, _, hvalue = line.partition(":")
            if hname.strip().lower() != "content-disposition":
                continue
            for param in hvalue.split(";")[1:]:
                key, _, value = param.strip().partition("=")
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                if key.lower() == "name":
                    name = value
                elif key.lower() == "filename":
                    filename = value
        if name is None:
            continue
        if filename is not None:
            files[name] = (filename, content)
        else:
            fields[name] = content.decode("utf-8", "replace")
    return fields, files


class FakeOpenAI:
    """A loopback OpenAI-compatible server; see the module docstring."""

    def __init__(self, latency: float = 0.0, faults: Callable[[int, dict], str | None] | dict | None = None,
                 reply: Callable[[dict], str] | None = None, retry_after: float = 0.5,
                 usage: tuple[int, int] = (11, 7), batch_polls_until_done: int = 1,
                 batch_fail: Callable[[str], bool] | None = None, batch_expire: bool = False,
                 chat_only: bool = False, models: list[str] | None = None, api_key: str | None = None,
                 served_suffix: str = "", system_fingerprint: str | None = None, reasoning_tokens: int = 64,
                 model_info: bool = True, batch_output: Callable[[bytes], bytes] | None = None,
                 reasoning_form: str | None = None, trace: Callable[[dict], str] | None = None,
                 deepseek_params: bool = False):
        if reasoning_form is not None and reasoning_form not in REASONING_FORMS:
            raise ValueError(f"reasoning_form: one of {REASONING_FORMS}, got {reasoning_form!r}")
        self.reasoning_form = reasoning_form
        self.trace = trace or default_trace
        self.deepseek_params = deepseek_params  # DeepSeek's reasoner rules: logprobs refused, sampling ignored
        self.chat_only = chat_only
        self.model_info = model_info  # with models=None: GET /v1/models/{id} answers for any name
        self.models = list(models) if models is not None else None
        self.api_key = api_key
        self.served_suffix = served_suffix
        self.system_fingerprint = system_fingerprint
        self.reasoning_tokens = reasoning_tokens
        self.latency = float(latency)
        self.faults = faults
        self.reply = reply or default_reply
        self.retry_after = retry_after
        self.usage = tuple(usage)
        self.batch_polls_until_done = int(batch_polls_until_done)
        self.batch_fail = batch_fail
        self.batch_expire = batch_expire
        self.batch_output = batch_output  # rewrites a job's output file (raw U+2028 as OpenAI writes it, a bad line)
        self.requests: list[dict] = []
        self.n_completions = 0  # completion requests seen so far (the next one gets fault index n_completions)
        self.n_connections = 0  # TCP connections accepted (keep-alive reuse keeps this small)
        self.files: dict[str, dict] = {}  # id -> {"filename", "purpose", "content"}
        self.batches: dict[str, dict] = {}  # id -> Batch object (plus private "_polls", "_done")
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.base_url: str | None = None
        self._n_files = 0
        self._n_batches = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop_ev: asyncio.Event | None = None
        self._conns: set[asyncio.Task] = set()
        self._open: dict[socket.socket, asyncio.StreamWriter | None] = {}  # accepted sockets not yet closed
        self._error: BaseException | None = None

    @classmethod
    def strict(cls, models: list[str] | None = None, api_key: str | None = None, **kw) -> "FakeOpenAI":
        """As OpenAI behaves: chat-only, served snapshot and fingerprint in each answer; see the module doc."""
        kw = {"chat_only": True, "served_suffix": "-2024-07-18", "system_fingerprint": "fp_fake0001",
              "model_info": False, **kw}
        return cls(models=models, api_key=api_key, **kw)

    @classmethod
    def deepseek(cls, api_key: str | None = None, **kw) -> "FakeOpenAI":
        """As DeepSeek's API serves deepseek-reasoner: `reasoning_content`, logprobs refused; see the module doc."""
        kw = {"reasoning_form": "reasoning_content", "deepseek_params": True, "chat_only": True,
              "model_info": False, "system_fingerprint": "fp_deepseek0", **kw}
        return cls(models=kw.pop("models", ["deepseek-chat", "deepseek-reasoner"]), api_key=api_key, **kw)

    @classmethod
    def vllm_reasoning(cls, models: list[str] | None = None, **kw) -> "FakeOpenAI":
        """As vLLM serves an R1-style model with `--reasoning-parser` since January 2026: the `reasoning` field only."""
        return cls(models=models or ["deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"], model_info=False,
                   **{"reasoning_form": "reasoning", **kw})

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "FakeOpenAI":
        if self._thread is not None or self._loop is not None:
            raise RuntimeError("FakeOpenAI can only be started once")
        self._thread = threading.Thread(target=self._run, name="fake-openai", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise RuntimeError("FakeOpenAI failed to start") from self._error
        if self.port is None:
            raise RuntimeError("FakeOpenAI did not start in time")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            loop.call_soon_threadsafe(self._stop_ev.set)
        except RuntimeError:  # loop already closed
            pass
        thread.join(10)
        self._thread = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._error = e
        finally:
            self._ready.set()
            try:  # connections accepted while stopping: cancel them and let them close their sockets
                for _ in range(5):
                    for _ in range(3):  # let scheduled callbacks (connection_made, connection_lost) run
                        loop.run_until_complete(asyncio.sleep(0))
                    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                    if not pending:
                        break
                    for t in pending:
                        t.cancel()
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _main(self) -> None:
        # An own accept callback rather than asyncio.start_server (on Python 3.11, closing a Server while an
        # accepted connection is being set up leaks that socket) or loop.sock_accept (cancelling it can drop an
        # accepted socket): every accepted socket is registered at once, so stop() can close them all.
        loop = asyncio.get_running_loop()
        self._stop_ev = asyncio.Event()
        lsock = socket.create_server(("127.0.0.1", 0), backlog=1024)  # loopback only, ephemeral port
        lsock.setblocking(False)
        self.port = lsock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        loop.add_reader(lsock.fileno(), self._on_accept, loop, lsock)
        self._ready.set()
        try:
            await self._stop_ev.wait()
        finally:
            loop.remove_reader(lsock.fileno())
            lsock.close()
            for task in list(self._conns):
                task.cancel()
            if self._conns:
                await asyncio.gather(*self._conns, return_exceptions=True)
            for sock, writer in list(self._open.items()):  # tasks cancelled before they ever ran
                if writer is not None:
                    writer.close()
                sock.close()
            self._open.clear()
            for _ in range(3):  # let connection_lost callbacks run
                await asyncio.sleep(0)

    def _on_accept(self, loop: asyncio.AbstractEventLoop, lsock: socket.socket) -> None:
        for _ in range(256):
            try:
                conn, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNABORTED, EMFILE: try again on the next readiness event
                return
            conn.setblocking(False)
            self._open[conn] = None
            self.n_connections += 1
            task = loop.create_task(self._connection(loop, conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    # ---------------------------------------------------------------- HTTP

    async def _connection(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        reader = asyncio.StreamReader(limit=1 << 20, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=conn)
        except OSError:
            self._open.pop(conn, None)
            conn.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        self._open[conn] = writer
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head[:-4].decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3:
                    return
                method, target, version = parts
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                try:
                    if headers.get("transfer-encoding", "").lower().endswith("chunked"):
                        raw = await self._read_chunked(reader)
                    else:
                        length = int(headers.get("content-length") or 0)
                        raw = await reader.readexactly(length) if length else b""
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
                    return
                conn_hdr = headers.get("connection", "").lower()
                keep_alive = "close" not in conn_hdr if version == "HTTP/1.1" else "keep-alive" in conn_hdr
                resp = await self._handle(method, target, headers, raw)
                if resp is None:  # "drop": close without answering
                    return
                status, ctype, body, extra = resp
                out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
                       f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                       f"connection: {'keep-alive' if keep_alive else 'close'}\r\n"]
                for k, v in extra:
                    out.append(f"{k}: {v}\r\n")
                out.append("\r\n")
                writer.write("".join(out).encode("latin-1") + body)
                await writer.drain()
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._open.pop(conn, None)
            writer.close()

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        chunks = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks)
            chunks.append((await reader.readexactly(size + 2))[:-2])

    async def _handle(self, method: str, target: str, headers: dict, raw: bytes):
        """Returns (status, content_type, body_bytes, extra_headers) or None to drop the connection."""
        path = target.split("?", 1)[0]
        ctype = headers.get("content-type", "")
        body: Any = raw or None
        if raw and ctype.startswith(_JSON):
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
        self.requests.append({"path": path, "method": method, "headers": headers, "body": body,
                              "t": time.monotonic()})
        try:
            if self.api_key is not None and path.startswith("/v1/"):
                token = headers.get("authorization", "").removeprefix("Bearer ").strip()
                if token != self.api_key:  # OpenAI shows the key masked: first 8 and last 4 characters
                    shown = f"{token[:8]}{'*' * 20}{token[-4:]}" if len(token) > 12 else token
                    return 401, _JSON, _error_body(f"Incorrect API key provided: {shown}. You can find your API key "
                                                   "at https://platform.openai.com/account/api-keys.",
                                                   "invalid_request_error", "invalid_api_key"), ()
            if path == "/v1/models" and method == "GET" and self.models is not None:
                return 200, _JSON, _dumps({"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0,
                     "owned_by": "system"} for m in self.models]}).encode(), ()
            if path.startswith("/v1/models/") and method == "GET" and (self.models is not None or self.model_info):
                from urllib.parse import unquote

                model = unquote(path[len("/v1/models/"):])
                if self.models is not None and model not in self.models:
                    return 404, _JSON, _error_body(f"The model `{model}` does not exist or you do not have access to "
                                                   "it.", "invalid_request_error", "model_not_found"), ()
                return 200, _JSON, _dumps({"id": model, "object": "model", "created": 0,
                                           "owned_by": "system"}).encode(), ()
            if path == "/v1/chat/completions" or path == "/v1/completions":
                if method != "POST":
                    return 405, _JSON, _error_body("method not allowed", "invalid_request_error"), ()
                if not isinstance(body, dict):
                    return 400, _JSON, _error_body("body must be a JSON object", "invalid_request_error"), ()
                refused = self._refuse(path == "/v1/chat/completions", body)
                if refused is not None:
                    return refused
                n = self.n_completions
                self.n_completions = n + 1
                return await self._completion(n, path == "/v1/chat/completions", body)
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            return self._batch_api(method, path, ctype, body, raw)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug or bad input: answer 500 instead of killing the connection
            return 500, _JSON, _error_body(f"fake server error: {type(e).__name__}: {e}", "server_error"), ()

    # ---------------------------------------------------------------- completions

    def _refuse(self, chat: bool, body: dict):
        """The strict checks, in OpenAI's order: model exists, endpoint fits the model, parameters fit it."""
        model = str(body.get("model"))
        if self.models is not None and model not in self.models:
            return 404, _JSON, _error_body(f"The model `{model}` does not exist or you do not have access to it.",
                                           "invalid_request_error", "model_not_found"), ()
        legacy = model in LEGACY_COMPLETION_MODELS
        if self.chat_only and not chat and not legacy:
            return 404, _JSON, _error_body(CHAT_MODEL_ON_COMPLETIONS, "invalid_request_error", None, "model"), ()
        if self.chat_only and chat and legacy:
            return 404, _JSON, _error_body(NOT_A_CHAT_MODEL, "invalid_request_error", None, "model"), ()
        if self.deepseek_params:
            for name in DEEPSEEK_REFUSED:
                if body.get(name) not in (None, False, 0):
                    return 400, _JSON, _error_body(f"{model} does not support the parameter `{name}`",
                                                   "invalid_request_error", "invalid_request_error"), ()
            for m in body.get("messages") or ():
                if isinstance(m, dict) and "reasoning_content" in m and m.get("role") == "assistant":
                    return 400, _JSON, _error_body("The reasoning_content of an assistant message must not be sent "
                                                   "back in the input messages.", "invalid_request_error",
                                                   "invalid_request_error"), ()
        if is_reasoning_model(model):
            if "max_tokens" in body:
                return 400, _JSON, _error_body("Unsupported parameter: 'max_tokens' is not supported with this model. "
                                               "Use 'max_completion_tokens' instead.", "invalid_request_error",
                                               "unsupported_parameter", "max_tokens"), ()
            for name in ("temperature", "top_p"):
                if body.get(name) is not None and body[name] != 1:
                    return 400, _JSON, _error_body(f"Unsupported value: '{name}' does not support {body[name]} with "
                                                   "this model. Only the default (1) value is supported.",
                                                   "invalid_request_error", "unsupported_value", name), ()
        return None

    def _fault(self, n: int, body: dict) -> str | None:
        faults = self.faults
        if faults is None:
            return None
        if callable(faults):
            return faults(n, body)
        return faults.get(n)

    def _completion_json(self, chat: bool, body: dict, rid: str, text: str, finish: str = "stop",
                         with_trace: bool = True) -> dict:
        u0, u1 = self.usage
        form = self.reasoning_form if with_trace else None
        fields: dict = {}
        if form is not None:
            trace = self.trace(body)
            u1 += len(trace.split())  # the trace is generated output: billed as completion tokens
            if not chat or form == "think_tags":
                text = f"<think>\n{trace}\n</think>\n\n{text}"
            elif form == "prefilled_think":
                text = f"{trace}\n</think>\n\n{text}"
            else:
                fields = {form: trace}
        if chat and self.reasoning_form == "reasoning" and not fields:
            fields = {"reasoning": None}  # vLLM always sends the field; reasoning_content is gone
        if chat and self.reasoning_form == "reasoning_content" and not fields:
            fields = {"reasoning_content": None}
        usage = {"prompt_tokens": u0, "completion_tokens": u1, "total_tokens": u0 + u1}
        if self.deepseek_params and form is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": u1 - self.usage[1]}
        model = body.get("model")
        if is_reasoning_model(str(model)):  # hidden reasoning: billed inside completion_tokens
            r = self.reasoning_tokens
            usage = {"prompt_tokens": u0, "completion_tokens": u1 + r, "total_tokens": u0 + u1 + r,
                     "completion_tokens_details": {"reasoning_tokens": r}}
        served = f"{model}{self.served_suffix}" if model is not None else None
        extra = {"system_fingerprint": self.system_fingerprint} if self.system_fingerprint else {}
        if chat:
            return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": 0, "model": served,
                    "choices": [{"index": 0, "finish_reason": finish,
                                 "message": {"role": "assistant", "content": text, **fields}}],
                    "usage": usage, **extra}
        return {"id": f"cmpl-{rid}", "object": "text_completion", "created": 0, "model": served,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                "usage": usage, **extra}

    async def _completion(self, n: int, chat: bool, body: dict):
        fault = self._fault(n, body)
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        rid = (("x-request-id", f"req_{n}"),)
        if fault is None:
            out = self._completion_json(chat, body, str(n), self.reply(body))
            return 200, _JSON, _dumps(out).encode(), rid
        if fault == "429":
            ra = self.retry_after
            return 429, _JSON, _error_body("Rate limit reached (injected)", "requests", "rate_limit_exceeded"), (
                ("retry-after", f"{ra:g}"), ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", f"{ra:g}s"), *rid)
        if fault in ("500", "503"):
            return int(fault), _JSON, _error_body(f"injected {fault}", "server_error"), rid
        if fault == "timeout":
            await asyncio.sleep(30)
            out = self._completion_json(chat, body, str(n), self.reply(body))
            return 200, _JSON, _dumps(out).encode(), rid
        if fault == "invalid_json":
            return 200, _JSON, b"not json{", rid
        if fault == "truncated_json":
            data = _dumps(self._completion_json(chat, body, str(n), self.reply(body))).encode()
            return 200, _JSON, data[: len(data) // 2], rid
        if fault == "drop":
            return None
        if fault == "missing_choices":
            out = self._completion_json(chat, body, str(n), self.reply(body))
            del out["choices"]
            return 200, _JSON, _dumps(out).encode(), rid
        if fault == "empty_content":
            return 200, _JSON, _dumps(self._completion_json(chat, body, str(n), "")).encode(), rid
        if fault == "length":
            out = self._completion_json(chat, body, str(n), self.reply(body), finish="length")
            return 200, _JSON, _dumps(out).encode(), rid
        if fault == "no_trace":
            out = self._completion_json(chat, body, str(n), self.reply(body), with_trace=False)
            return 200, _JSON, _dumps(out).encode(), rid
        raise ValueError(f"unknown fault kind {fault!r}")

    # ---------------------------------------------------------------- files and batches

    def _new_file(self, filename: str, purpose: str, content: bytes) -> dict:
        self._n_files += 1
        fid = f"file-{self._n_files}"
        self.files[fid] = {"filename": filename, "purpose": purpose, "content": content}
        return self._file_obj(fid)

    def _file_obj(self, fid: str) -> dict:
        f = self.files[fid]
        return {"id": fid, "object": "file", "bytes": len(f["content"]), "created_at": 0,
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed"}

    @staticmethod
    def _not_found(what: str):
        return 404, _JSON, _error_body(f"No such {what}", "invalid_request_error", "not_found"), ()

    def _batch_api(self, method: str, path: str, ctype: str, body: Any, raw: bytes):
        ok = lambda obj: (200, _JSON, _dumps(obj).encode(), ())  # noqa: E731
        parts = path.split("/")  # ["", "v1", resource, ...]
        if len(parts) < 3 or parts[1] != "v1":
            return self._not_found(f"route {method} {path}")
        resource, rest = parts[2], parts[3:]
        if resource == "files":
            if not rest and method == "POST":
                if not ctype.startswith("multipart/form-data"):
                    return 400, _JSON, _error_body("expected multipart/form-data", "invalid_request_error"), ()
                fields, files = _parse_multipart(raw, ctype)
                if "file" not in files:
                    return 400, _JSON, _error_body("missing 'file'", "invalid_request_error"), ()
                filename, content = files["file"]
                return ok(self._new_file(filename, fields.get("purpose", "batch"), content))
            if rest and rest[0] in self.files:
                fid = rest[0]
                if len(rest) == 1 and method == "GET":
                    return ok(self._file_obj(fid))
                if len(rest) == 1 and method == "DELETE":
                    del self.files[fid]
                    return ok({"id": fid, "object": "file", "deleted": True})
                if len(rest) == 2 and rest[1] == "content" and method == "GET":
                    return 200, "application/octet-stream", self.files[fid]["content"], ()
            return self._not_found(f"file {path}")
        if resource == "batches":
            if not rest and method == "POST":
                if not isinstance(body, dict):
                    return 400, _JSON, _error_body("body must be a JSON object", "invalid_request_error"), ()
                fid = body.get("input_file_id")
                if fid not in self.files:
                    return 400, _JSON, _error_body(f"input file {fid!r} not found", "invalid_request_error"), ()
                lines = [ln for ln in self.files[fid]["content"].splitlines() if ln.strip()]
                self._n_batches += 1
                bid = f"batch_{self._n_batches}"
                batch = {"id": bid, "object": "batch", "endpoint": body.get("endpoint"), "input_file_id": fid,
                         "completion_window": body.get("completion_window", "24h"), "status": "in_progress",
                         "created_at": 0, "in_progress_at": 0, "output_file_id": None, "error_file_id": None,
                         "errors": None, "metadata": body.get("metadata"),
                         "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                         "_polls": 0, "_done": False}
                self.batches[bid] = batch
                if self.batch_polls_until_done <= 0:
                    self._finish_batch(batch)
                return ok(self._public(batch))
            if rest and rest[0] in self.batches:
                batch = self.batches[rest[0]]
                if len(rest) == 1 and method == "GET":
                    batch["_polls"] += 1
                    if batch["_polls"] >= self.batch_polls_until_done:
                        self._finish_batch(batch)
                    return ok(self._public(batch))
                if len(rest) == 2 and rest[1] == "cancel" and method == "POST":
                    if not batch["_done"]:
                        batch.update(status="cancelled", cancelled_at=0, _done=True)
                    return ok(self._public(batch))
            return self._not_found(f"batch {path}")
        return self._not_found(f"route {method} {path}")

    @staticmethod
    def _public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _finish_batch(self, batch: dict) -> None:
        if batch["_done"]:
            return
        batch["_done"] = True
        bnum = batch["id"].split("_", 1)[1]
        out_lines: list[bytes] = []
        err_lines: list[bytes] = []
        for i, line in enumerate(ln for ln in self.files[batch["input_file_id"]]["content"].splitlines()
                                 if ln.strip()):
            rid = f"batch_req_{bnum}_{i}"
            try:
                item = json.loads(line)
                custom_id = item.get("custom_id")
                req = item.get("body") or {}
                url = item.get("url") or batch["endpoint"] or "/v1/chat/completions"
            except (ValueError, AttributeError):
                err_lines.append(_dumps({"id": rid, "custom_id": None, "response": None,
                                         "error": {"code": "invalid_json", "message": "bad input line"}}).encode())
                continue
            if self.batch_expire:
                err_lines.append(_dumps({"id": rid, "custom_id": custom_id, "response": None,
                                         "error": {"code": "batch_expired",
                                                   "message": "This request could not be executed before the "
                                                              "completion window expired."}}).encode())
            elif self.batch_fail is not None and self.batch_fail(custom_id):
                err_lines.append(_dumps({"id": rid, "custom_id": custom_id, "response": None,
                                         "error": {"code": "server_error", "message": "injected"}}).encode())
            else:
                chat = not url.endswith("/v1/completions") and url != "/completions"
                resp = self._completion_json(chat, req, f"b{bnum}-{i}", self.reply(req))
                out_lines.append(_dumps({"id": rid, "custom_id": custom_id,
                                         "response": {"status_code": 200, "request_id": f"req_b{bnum}_{i}",
                                                      "body": resp},
                                         "error": None}).encode())
        if out_lines:
            batch["output_file_id"] = self._new_file(f"{batch['id']}_output.jsonl", "batch_output",
                                                     (self.batch_output or bytes)(b"\n".join(out_lines) + b"\n"))["id"]
        if err_lines:
            batch["error_file_id"] = self._new_file(f"{batch['id']}_error.jsonl", "batch_output",
                                                    b"\n".join(err_lines) + b"\n")["id"]
        batch["request_counts"] = {"total": batch["request_counts"]["total"], "completed": len(out_lines),
                                   "failed": len(err_lines)}
        batch["finalizing_at"] = 0
        if self.batch_expire:
            batch.update(status="expired", expired_at=0)
        else:
            batch.update(status="completed", completed_at=0)
