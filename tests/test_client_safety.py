"""Issue 22's model-client findings: the API key never reaches a written file or a log, answers are served
only to the endpoint that produced them, a full cache disk loses no paid answer, and a Batch output line
with U+2028 (or a malformed one) does not block its job."""

from __future__ import annotations

import errno
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import stages.lib.llm.store as store_module
from stages.lib.errors import StageError
from stages.lib.llm.backend import make_backend
from stages.lib.llm.cache import ResponseCache, assign_keys
from stages.lib.llm.client import ModelClient, run_requests
from stages.lib.llm.endpoint import ApiParams
from stages.lib.llm.openai_wire import redact
from stages.lib.llm.store import TeacherStore
from stages.lib.llm.types import Sampling, TeacherStop
from tests.support.fake_openai import FakeOpenAI

S = Sampling(32, 0.7, 1.0, seed=3)
FAST = ApiParams(concurrency=2, max_attempts=1, backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=5.0)
SECRET = "zq9Xw4" * 6  # a local server's token: nothing like `sk-...`, so only the key itself can redact it


class EchoHandler(BaseHTTPRequestHandler):
    """Answers GET /models/<m> with the model, and every completion with `status` and a message that
    quotes the (trimmed) bearer token, as servers that say `Incorrect API key provided: <key>` do."""

    status = 500

    def log_message(self, *args):
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._answer(200, {"id": "teacher-x", "object": "model"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        self._answer(EchoHandler.status, {"error": {"message": f"key {token} refused", "code": None}})


@pytest.fixture
def echo():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def client(url, tmp_path, **kw) -> ModelClient:
    cache = ResponseCache(tmp_path / "cache", store=TeacherStore(tmp_path / "store"))
    return ModelClient(lambda form: make_backend("openai", "teacher-x", form, url, api=FAST), cache, **kw)


# ---------------------------------------------------------------- the key


@pytest.mark.parametrize("raw", [SECRET + "\n", f"  {SECRET}  "], ids=["trailing-newline", "surrounding-spaces"])
@pytest.mark.parametrize("status", [500, 401])
def test_the_key_is_in_no_written_file_message_or_log(echo, tmp_path, monkeypatch, capfd, raw, status):
    monkeypatch.setenv("OPENAI_API_KEY", raw)
    EchoHandler.status = status
    c = client(echo, tmp_path)
    said = ""
    try:
        c.ask(["p 0", "p 1"], S, "chat")
    except TeacherStop as stop:  # 401 on the one-token test request: what generate writes as `error`
        said = str(stop)
    (tmp_path / "metrics.json").write_text(json.dumps({**c.metrics(), "error": said}))
    written = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.name.startswith("failures-") for f in written) and bool(said) == (status == 401)
    out, err = capfd.readouterr()
    assert "key [redacted] refused" in said + json.dumps(c.metrics())
    for text in [f.read_text() for f in written] + [said, out, err]:
        assert SECRET not in text


@pytest.mark.parametrize("raw", ["ab12 cd34ef56", "ab12\tcd34", "ab12\x01cd34ef"])
def test_a_key_with_whitespace_or_control_characters_inside_is_refused_unquoted(monkeypatch, raw):
    monkeypatch.setenv("OPENAI_API_KEY", raw)
    with pytest.raises(StageError, match="OPENAI_API_KEY .* inside") as e:
        make_backend("openai", "gpt-4o-mini", "chat", None)
    assert "ab12" not in str(e.value) and "cd34" not in str(e.value)


@pytest.mark.parametrize("raw", [None, "", "  \n"])
def test_a_missing_key_says_the_variable_is_not_set(monkeypatch, raw):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False) if raw is None else monkeypatch.setenv("OPENAI_API_KEY", raw)
    with pytest.raises(StageError, match="OPENAI_API_KEY is not set"):
        make_backend("openai", "gpt-4o-mini", "chat", None)


def test_credentials_and_query_strings_in_base_url_are_never_quoted(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    port = srv.server_address[1]
    srv.server_close()  # nothing listens there: "cannot reach the endpoint"
    c = client(f"http://alice:pa55word@127.0.0.1:{port}/v1?api-key=hush", tmp_path)
    with pytest.raises(TeacherStop, match="cannot reach") as e:
        c.ask(["p 0"], S, "chat")
    assert "pa55word" not in str(e.value) and "hush" not in str(e.value) and "127.0.0.1" in str(e.value)
    assert redact("at https://u:p@h.example/v1?k=v.") == "at https://[redacted]@h.example/v1?[redacted]"


# ---------------------------------------------------------------- endpoints and the store


def test_a_stored_record_that_does_not_answer_its_key_is_not_served(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with FakeOpenAI() as srv:
        assert all(client(srv.base_url, tmp_path).ask(["p 0", "p 1"], S, "chat"))
        (tmp_path / "cache").rename(tmp_path / "gone")  # a fresh workspace: the store answers
        capfd.readouterr()
        assert all(client(srv.base_url, tmp_path).ask(["p 0", "p 1"], S, "chat"))
        assert "(2 from the teacher store)" in capfd.readouterr().err
        (tmp_path / "cache").rename(tmp_path / "gone2")
        f = sorted((tmp_path / "store").rglob("*.json"))[0]
        rec = json.loads(f.read_text())
        f.write_text(json.dumps({**rec, "prompt": "another question", "text": "a planted answer"}))
        n = len(srv.requests)
        recs = client(srv.base_url, tmp_path).ask(["p 0", "p 1"], S, "chat")
        assert "a planted answer" not in [r["text"] for r in recs] and len(srv.requests) > n
        assert "cached records not served: {'mismatch'" in capfd.readouterr().err


# ---------------------------------------------------------------- a full disk


def test_a_full_cache_disk_keeps_every_paid_answer_and_stops_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    real_open, writes = open, []

    class Full:
        """A workspace cache file on a disk that fills after 4 records (the store's disk has room)."""

        def __init__(self, f):
            self.f = f

        def write(self, text):
            writes.append(text)
            if len(writes) > 4:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def full_open(path, *a, **k):
        f = real_open(path, *a, **k)
        return Full(f) if str(path).endswith(".jsonl") else f

    monkeypatch.setattr(store_module, "open", full_open, raising=False)
    with FakeOpenAI() as srv:
        ps = [f"p {i}" for i in range(6)]
        with pytest.raises(StageError, match=f"teacher cache {tmp_path / 'cache'}: cannot write") as e:
            client(srv.base_url, tmp_path).ask(ps, S, "chat")
        assert "\n" not in str(e.value) and "teacher store" in str(e.value)
        calls = [r for r in srv.requests if r["path"].endswith("/chat/completions")]
        assert len(calls) == 6 and len(list((tmp_path / "store").rglob("*.json"))) == 6
        monkeypatch.setattr(store_module, "open", real_open, raising=False)
        recs = client(srv.base_url, tmp_path).ask(ps, S, "chat")  # space freed: the store serves all six
        assert all(recs) and len([r for r in srv.requests if r["path"].endswith("/chat/completions")]) == 6


# ---------------------------------------------------------------- Batch output


def test_a_batch_answer_with_u2028_and_a_malformed_line_do_not_block_the_job(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    raw = "\u2028".encode()
    bad = b'{not json\n[1, 2]\n{"custom_id": "x", "response": "a string"}\n'
    mangle = lambda b: b.replace(b"\\u2028", raw) + bad  # noqa: E731 - OpenAI writes U+2028 raw
    reqs = assign_keys(["a\u2028b", "c"], "openai:teacher-x", "chat", S)
    with FakeOpenAI(reply=lambda body: "line\u2028same line", batch_output=mangle) as srv:
        backend = make_backend("openai", "teacher-x", "chat", srv.base_url, api=FAST)
        run_requests(reqs, backend, ResponseCache(tmp_path), S, batch_api=True)  # submitted
        recs, st = run_requests(reqs, backend, ResponseCache(tmp_path), S, batch_api=True)  # collected
        assert [r["text"] for r in recs] == ["line\u2028same line"] * 2
        assert st.batch["collected"] == 2 and st.counts["batch.failed:batch:malformed_line"] == 3
        assert ResponseCache(tmp_path).ledger.open_jobs() == []


def test_a_batch_api_error_stops_with_the_servers_words_redacted(echo, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", f" {SECRET}\n")
    EchoHandler.status = 401
    backend = make_backend("openai", "teacher-x", "chat", echo, api=FAST)
    with pytest.raises(TeacherStop, match="Batch API AuthenticationError") as e:
        run_requests(assign_keys(["p 0"], backend.teacher_id, "chat", S), backend, ResponseCache(tmp_path), S,
                     batch_api=True)
    assert "key [redacted] refused" in str(e.value) and SECRET not in str(e.value)
