"""The OpenAI-compatible backend against a small loopback server speaking the Chat/Completions API."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stages.lib.common import StageError
from stages.generate import rows_from_records
from stages.lib.llm.teacher import ResponseCache, Sampling, assign_keys, make_backend, run_requests

TEXT = " Name a fruit that is red.\n4. Input:\n<noinput>\n4. Output:\nA strawberry.\n###"


class Handler(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.seen.append((self.path, self.headers.get("Authorization"), body))
        usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        if self.path.endswith("/chat/completions"):
            out = {"id": f"chatcmpl-{len(Handler.seen)}", "object": "chat.completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": TEXT}}],
                   "usage": usage}
        else:
            out = {"id": f"cmpl-{len(Handler.seen)}", "object": "text_completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "finish_reason": "stop", "text": TEXT, "logprobs": None}], "usage": usage}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    Handler.seen = []
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


@pytest.mark.parametrize("form", ["chat", "completion"])
@pytest.mark.parametrize("transport", ["direct", "sdk"])
def test_openai_backend_calls_once_and_keeps_the_key_out(server, tmp_path, monkeypatch, form, transport):
    secret = "sk-test-" + "x" * 24
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    s = Sampling(64, 0.7, 0.9)
    from stages.lib.llm.openai_api import ApiLimits

    backend = make_backend("openai", "teacher-x", form, server, limits=ApiLimits(transport=transport))
    reqs = assign_keys(["p1", "p2", "p3"], backend.teacher_id, form, s)
    recs, stats = run_requests(reqs, backend, ResponseCache(tmp_path / "cache"), s)
    assert stats.teacher_calls == 3 and len(Handler.seen) == 3
    path, auth, body = Handler.seen[0]
    assert path == ("/v1/chat/completions" if form == "chat" else "/v1/completions")
    assert auth == f"Bearer {secret}" and body["model"] == "teacher-x" and body["max_tokens"] == 64
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9
    tasks, _ = rows_from_records(recs, [["a"]] * 3, 4)
    assert [t["output"] for t in tasks] == ["A strawberry."] * 3
    assert {t["response_id"] for t in tasks} <= {"chatcmpl-1", "chatcmpl-2", "chatcmpl-3", "cmpl-1", "cmpl-2", "cmpl-3"}
    # the rerun is free, and the key is nowhere on disk
    recs2, stats2 = run_requests(reqs, make_backend("openai", "teacher-x", form, server), ResponseCache(tmp_path / "cache"), s)
    assert stats2.teacher_calls == 0 and len(Handler.seen) == 3
    assert all(secret not in f.read_text() for f in (tmp_path / "cache").iterdir())


def test_openai_backend_needs_a_key_for_the_public_endpoint(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(StageError, match="OPENAI_API_KEY"):
        make_backend("openai", "gpt-4o-mini", "chat", None)
