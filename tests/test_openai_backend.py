"""The OpenAI-compatible backend against a small loopback server speaking the Chat/Completions API."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stages.lib.errors import StageError
from stages.lib.generation.alpaca import rows_from_records
from stages.lib.llm.backend import make_backend
from stages.lib.llm.cache import ResponseCache, assign_keys
from stages.lib.llm.client import ModelClient, run_requests
from stages.lib.llm.types import Sampling

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
            out = {"id": f"chatcmpl-{len(Handler.seen)}", "object": "chat.completion", "created": 0,
                   "model": body["model"],
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": TEXT}}],
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
def test_openai_backend_calls_once_and_keeps_the_key_out(server, tmp_path, monkeypatch, form):
    secret = "sk-test-" + "x" * 24
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    s = Sampling(64, 0.7, 0.9)
    backend = make_backend("openai", "teacher-x", form, server)
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
    recs2, stats2 = run_requests(reqs, make_backend("openai", "teacher-x", form, server),
                                 ResponseCache(tmp_path / "cache"), s)
    assert stats2.teacher_calls == 0 and len(Handler.seen) == 3
    assert all(secret not in f.read_text() for f in (tmp_path / "cache").iterdir())


def test_openai_backend_needs_a_key_for_the_public_endpoint(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(StageError, match="OPENAI_API_KEY"):
        make_backend("openai", "gpt-4o-mini", "chat", None)


# ---------------------------------------------------------------- against servers that behave like OpenAI's

from stages.lib.llm.endpoint import ApiParams  # noqa: E402
from stages.lib.llm.openai_wire import RequestOptions, error_message, is_reasoning_model, request_body  # noqa: E402
from stages.lib.llm.types import TeacherStop, provenance  # noqa: E402
from tests.support.fake_openai import FakeOpenAI  # noqa: E402

KEY = "sk-proj-" + "q7" * 24
FAST = ApiParams(backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=5.0)


def completions(srv):
    return [r for r in srv.requests if r["path"].endswith("completions")]


def test_one_request_builder_per_model_family():
    assert [is_reasoning_model(m) for m in ["o1", "o3-mini", "o4-mini", "gpt-5", "gpt-5.4-mini", "openai/o3",
                                            "gpt-4o-mini", "gpt-4.1", "llama3.1:8b", "Qwen/Qwen2.5-7B", "omni"]] == \
        [True] * 6 + [False] * 5
    path, body = request_body("gpt-4o-mini", "chat", ("Be brief.", "Hi"), 64, 0.7, 0.9, ("\n",), 5)
    assert path == "/chat/completions" and body == {
        "model": "gpt-4o-mini", "max_tokens": 64, "temperature": 0.7, "top_p": 0.9, "stop": ["\n"], "seed": 5,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    opts = RequestOptions(extra_body={"reasoning_effort": "low"}, reasoning_budget=100)
    path, body = request_body("o4-mini", "chat", "Hi", 64, 0.7, 0.9, ("\n",), 5, opts)
    assert body == {"model": "o4-mini", "max_completion_tokens": 164, "seed": 5, "reasoning_effort": "low",
                    "messages": [{"role": "user", "content": "Hi"}]}
    # an explicit family wins over the name; vLLM's extra sampling fields go as given
    _, body = request_body("my-proxy-name", "completion", "Hi", 8, 0.7, 1.0, (), 0,
                           RequestOptions("reasoning", reasoning_budget=0))
    assert "max_tokens" not in body and body["max_completion_tokens"] == 8 and body["prompt"] == "Hi"
    _, body = request_body("Qwen/Qwen2.5-7B", "completion", "Hi", 8, 0.7, 1.0, (), 0,
                           RequestOptions(extra_body={"top_k": 20}))
    assert body["top_k"] == 20 and body["max_tokens"] == 8 and body["temperature"] == 0.7
    with pytest.raises(ValueError, match="cannot be overridden"):
        RequestOptions(extra_body={"messages": []})


def test_a_reasoning_model_gets_requests_it_accepts_and_its_reasoning_is_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    s = Sampling(64, 0.7, 0.9, ("\n",), seed=1)
    with FakeOpenAI.strict(models=["o4-mini"], api_key=KEY, reasoning_tokens=50) as srv:
        b = make_backend("openai", "o4-mini", "chat", srv.base_url, api=FAST,
                         options=RequestOptions(extra_body={"reasoning_effort": "low"}, reasoning_budget=256))
        session = ModelClient(lambda form: b, ResponseCache(tmp_path))
        recs = session.ask(["p1", ("You are terse.", "p2")], s, "chat")
    assert all(recs) and session.stats.failed == 0 and session.stats.teacher_calls == 2
    sent = completions(srv)
    assert len(sent) == 2 and srv.requests[0]["path"] == "/v1/models/o4-mini"  # checked, for free
    for r in sent:
        body = r["body"]
        assert body["max_completion_tokens"] == 64 + 256 and body["reasoning_effort"] == "low"
        assert not {"max_tokens", "temperature", "top_p", "stop"} & set(body)
    by_user = {r["body"]["messages"][-1]["content"]: r["body"]["messages"] for r in sent}  # sent concurrently
    assert by_user["p2"][0] == {"role": "system", "content": "You are terse."} and len(by_user["p1"]) == 1
    # reasoning tokens: counted apart and inside the billed completion tokens
    assert session.stats.reasoning_tokens == 100 and session.stats.completion_tokens == 2 * (7 + 50)
    prov = provenance(recs[1])
    assert prov["served_model"] == "o4-mini-2024-07-18" and prov["system_fingerprint"] == "fp_fake0001"
    assert recs[0]["reasoning_tokens"] == 50


def test_the_old_request_shape_is_what_openai_refuses_for_o4_mini(tmp_path, monkeypatch):
    """Forcing the standard family on o4-mini sends max_tokens and temperature: the endpoint check's tiny
    request is refused with OpenAI's message, and the stage stops before any paid request."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAI.strict(api_key=KEY) as srv:  # no models list: the check sends one tiny request
        b = make_backend("openai", "o4-mini", "chat", srv.base_url, api=FAST, options=RequestOptions("standard"))
        reqs = assign_keys(["p1", "p2", "p3"], b.teacher_id, "chat", Sampling(16, 0.7, 1.0))
        with pytest.raises(TeacherStop, match="HTTP 400 .*Unsupported parameter: 'max_tokens'"):
            run_requests(reqs, b, ResponseCache(tmp_path), Sampling(16, 0.7, 1.0), check=True)
    assert len(completions(srv)) == 1 and completions(srv)[0]["body"]["max_tokens"] == 1


@pytest.mark.parametrize("case", ["model", "key", "url"])
def test_the_endpoint_check_names_a_wrong_model_key_or_url(tmp_path, monkeypatch, case):
    monkeypatch.setenv("OPENAI_API_KEY", KEY if case != "key" else "sk-wrong-" + "w" * 30)
    with FakeOpenAI.strict(models=["gpt-4o-mini"], api_key=KEY) as srv:
        url = srv.base_url if case != "url" else "http://127.0.0.1:9/v1"
        model = "gpt-4o-mnii" if case == "model" else "gpt-4o-mini"
        b = make_backend("openai", model, "chat", url, api=FAST)
        reqs = assign_keys(["p1", "p2"], b.teacher_id, "chat", Sampling(16, 0.7, 1.0))
        with pytest.raises(TeacherStop) as e:
            run_requests(reqs, b, ResponseCache(tmp_path), Sampling(16, 0.7, 1.0), check=True)
    want = {"model": "HTTP 404 on GET /models/gpt-4o-mnii: The model `gpt-4o-mnii` does not exist or you do not have "
                     "access to it.",
            "key": "Incorrect API key provided: sk-[redacted]", "url": "cannot reach the endpoint"}[case]
    assert want in str(e.value), str(e.value)
    assert "w" * 30 not in str(e.value)
    assert not completions(srv)  # nothing was paid for


def test_a_fatal_error_stops_the_run_with_the_servers_message(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAI.strict(models=["gpt-4o-mini"], api_key=KEY) as srv:
        b = make_backend("openai", "gpt-4o-mnii", "chat", srv.base_url,
                         api=ApiParams(concurrency=2, backoff_base_s=0.01, timeout_s=5.0))
        reqs = assign_keys([f"p{i}" for i in range(20)], b.teacher_id, "chat", Sampling(16, 0.7, 1.0))
        cache = ResponseCache(tmp_path)
        with pytest.raises(TeacherStop) as e:  # no check: the run itself meets the 404
            run_requests(reqs, b, cache, Sampling(16, 0.7, 1.0))
    assert len(completions(srv)) <= 2  # in flight when the first 404 came back; none retried, the rest unsent
    assert "HTTP 404 The model `gpt-4o-mnii` does not exist" in str(e.value) and "not sent" in str(e.value)
    failures = ResponseCache(tmp_path).failures
    assert 1 <= len(failures) <= 2
    assert {f["reason"] for f in failures.values()} == {"http_404"}
    assert all("does not exist" in f["message"] for f in failures.values())
    assert all(KEY not in p.read_text() for p in tmp_path.iterdir())


def test_error_messages_are_truncated_and_keys_redacted():
    body = json.dumps({"error": {"message": "Incorrect API key provided: sk-abc123456789xyz. " + "x" * 500}})
    msg = error_message(body.encode(), "sk-abc123456789xyz")
    assert "abc123456789xyz" not in msg and msg.startswith("Incorrect API key provided: [redacted]. xxx")
    assert error_message(b'{"error": {"message": "key sk-proj-ABCDEF123456 is revoked"}}') == \
        "key sk-[redacted] is revoked"  # a key that is not ours is redacted too
    assert len(msg) <= 300
    assert error_message(b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert "secret-token-1234" not in error_message(b"Authorization: Bearer secret-token-1234 refused")


# ---------------------------------------------------------------- the typed client


def test_a_response_body_is_one_declared_completion():
    from dataclasses import fields

    from stages.lib.llm.openai_wire import completion_from_body
    from stages.lib.llm.types import Completion

    body = {"id": "chatcmpl-9", "model": "o4-mini-2025-04-16", "system_fingerprint": "fp_9",
            "choices": [{"message": {"content": "hi"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "completion_tokens_details": {"reasoning_tokens": 9}}}
    c = completion_from_body(body, "chat")
    assert (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) == ("hi", "length", 5, 9)
    assert c.reasoning_tokens == 9  # inside completion_tokens, never more than it
    assert (c.response_id, c.served_model, c.system_fingerprint, c.reasoning, c.logprobs) == \
        ("chatcmpl-9", "o4-mini-2025-04-16", "fp_9", None, None)
    assert {f.name for f in fields(Completion)} >= {"reasoning", "logprobs", "served_model", "system_fingerprint"}
    with pytest.raises(AttributeError):
        c.undeclared = 1  # slotted: nothing is pinned on at run time


def test_client_stats_sum_every_round_and_keep_the_metrics_keys(tmp_path, monkeypatch):
    """Two rounds on one client: calls, tokens, failures and the online client's retries add up, and
    `metrics()` writes the keys generate's metrics always had."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAI(faults={0: "500", 3: "429"}, retry_after=0.01, usage=(11, 7)) as srv:
        b = make_backend("openai", "teacher-x", "chat", srv.base_url, api=FAST)
        client = ModelClient(lambda form: b, ResponseCache(tmp_path))
        assert all(client.ask(["a", "b"], Sampling(16, 0.7, 1.0), "chat"))
        assert all(client.ask(["c", "d", "a"], Sampling(16, 0.7, 1.0), "chat"))
    s = client.stats
    assert (s.requests, s.cache_hits, s.teacher_calls, s.failed) == (5, 1, 4, 0)
    assert (s.prompt_tokens, s.completion_tokens) == (4 * 11, 4 * 7)  # counted once, from the answers
    assert s.api["sent"] == 6 and s.api["retries"] == 2 and s.api["errors"] == {"http_500": 1, "http_429": 1}
    assert s.by_finish == {"stop": 5}
    m = client.metrics()
    assert set(m) == {"requests", "cache_hits", "teacher_calls", "failed", "failed_by_reason", "failure_messages",
                      "finish_reasons", "prompt_tokens_called", "completion_tokens_called", "reasoning_tokens_called",
                      "completion_tokens_per_s", "cost_usd_called", "api_requests_sent", "api_retries", "api_errors",
                      "api_error_messages", "api_not_sent"}
    assert m["api_requests_sent"] == 6 and m["api_errors"] == {"http_500": 1, "http_429": 1}


@pytest.mark.parametrize("section, key, line", [
    ("generate", "model", "generate.model: moved to generate.teacher.model"),
    ("generate", "base_url", "generate.base_url: moved to generate.teacher.base_url"),
    ("generate", "concurrency", "generate.concurrency: moved to generate.api.concurrency"),
    ("generate", "max_cost_usd", "generate.max_cost_usd: moved to generate.api.max_cost_usd"),
    ("generate", "api_transport",
     "generate.api_transport: removed (one HTTP stack, aiohttp, for every online request)"),
    ("select", "concurrency", "select.concurrency: moved to select.api.concurrency"),
])
def test_an_old_key_fails_with_one_line_naming_its_new_place(tmp_path, section, key, line):
    import yaml

    from stages.generate import GenerateParams
    from stages.lib.params import load_params
    from stages.select import SelectParams
    from tests.support.tiny import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params[section][key] = "x"  # what `dvc exp run -S generate.model=x` writes
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(StageError) as e:
        load_params({"generate": GenerateParams, "select": SelectParams}[section], section, tmp_path / "params.yaml")
    assert str(e.value) == f"{tmp_path / 'params.yaml'}: {line}"
