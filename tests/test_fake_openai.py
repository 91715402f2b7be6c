"""The loopback fake OpenAI server (tests/support/fake_openai.py), checked with the real openai SDK."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import openai
import pytest

from tests.support.fake_openai import FakeOpenAI

MSG = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Name a fruit that is red."}]


def sync_client(srv: FakeOpenAI, **kw) -> openai.OpenAI:
    return openai.OpenAI(api_key="test", base_url=srv.base_url, max_retries=0, **kw)


def async_client(srv: FakeOpenAI, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="test", base_url=srv.base_url, max_retries=0, **kw)


def chat(client: openai.OpenAI, **kw):
    return client.chat.completions.create(model="teacher-x", messages=MSG, **kw)


@pytest.fixture
def srv():
    with FakeOpenAI() as s:
        yield s


def test_binds_loopback_only_on_an_ephemeral_port(srv):
    assert srv.base_url == f"http://127.0.0.1:{srv.port}/v1"
    assert srv.port and srv.port > 0
    with socket.create_connection(("127.0.0.1", srv.port), timeout=2):
        pass


def test_chat_and_completions_return_text_and_usage(srv):
    with sync_client(srv) as c:
        r = chat(c, max_tokens=16)
        assert r.choices[0].message.content == "answer to: Name a fruit that is red."
        assert r.choices[0].finish_reason == "stop"
        assert r.model == "teacher-x" and r.id == "chatcmpl-0"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 7, 18)

        r = c.completions.create(model="teacher-x", prompt="Write a haiku about tests", max_tokens=8)
        assert r.choices[0].text == "answer to: Write a haiku about tests"
        assert r.choices[0].finish_reason == "stop" and r.id == "cmpl-1"
        assert r.usage.total_tokens == 18

    assert [q["path"] for q in srv.requests] == ["/v1/chat/completions", "/v1/completions"]
    first = srv.requests[0]
    assert first["method"] == "POST"
    assert first["headers"]["authorization"] == "Bearer test"
    assert first["body"]["messages"] == MSG and first["body"]["max_tokens"] == 16
    assert srv.requests[0]["t"] <= srv.requests[1]["t"]
    assert srv.n_completions == 2
    assert srv.n_connections == 1  # keep-alive: both calls went over one connection


def raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_raw_http_chunked_body_connection_close_and_404(srv):
    body = json.dumps({"model": "m", "prompt": "raw"}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    resp = raw_http(srv.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked)
    head, _, payload = resp.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in head
    assert json.loads(payload)["choices"][0]["text"] == "answer to: raw"
    resp = raw_http(srv.port, b"GET /nope HTTP/1.0\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 404 ") and json.loads(resp.partition(b"\r\n\r\n")[2])["error"]
    assert srv.requests[0]["body"] == {"model": "m", "prompt": "raw"}


def test_unknown_fault_kind_is_a_500():
    with FakeOpenAI(faults={0: "bogus"}) as s, sync_client(s) as c:
        with pytest.raises(openai.InternalServerError, match="unknown fault kind"):
            chat(c)


def test_custom_reply_and_usage():
    with FakeOpenAI(reply=lambda body: body["model"].upper(), usage=(3, 4)) as s, sync_client(s) as c:
        r = chat(c)
        assert r.choices[0].message.content == "TEACHER-X"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 4, 7)


def test_async_client_chat(srv):
    asyncio.run(_test_async_client_chat(srv))


async def _test_async_client_chat(srv):
    async with async_client(srv) as c:
        r = await c.chat.completions.create(model="m", messages=MSG)
        assert r.choices[0].message.content.startswith("answer to: ")
        r = await c.completions.create(model="m", prompt="p")
        assert r.choices[0].text == "answer to: p"


def test_429_is_a_rate_limit_error_with_retry_after():
    with FakeOpenAI(faults={0: "429"}, retry_after=0.25) as s, sync_client(s) as c:
        with pytest.raises(openai.RateLimitError) as ei:
            chat(c)
        h = ei.value.response.headers
        assert ei.value.status_code == 429
        assert h["retry-after"] == "0.25"
        assert h["x-ratelimit-remaining-requests"] == "0"
        assert h["x-ratelimit-reset-requests"] == "0.25s"
        assert chat(c).choices[0].message.content  # the next request is fine


@pytest.mark.parametrize("kind", ["500", "503"])
def test_server_errors(kind):
    with FakeOpenAI(faults={0: kind}) as s, sync_client(s) as c:
        with pytest.raises(openai.InternalServerError) as ei:
            chat(c)
        assert ei.value.status_code == int(kind)


def test_timeout_is_an_api_timeout_error():
    with FakeOpenAI(faults={0: "timeout"}) as s, sync_client(s, timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            chat(c)
        assert time.monotonic() - t0 < 2
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 2  # stop() does not wait for the 30 s sleep


def test_drop_is_a_connection_error_and_the_server_keeps_serving():
    with FakeOpenAI(faults={0: "drop"}) as s, sync_client(s) as c:
        with pytest.raises(openai.APIConnectionError) as ei:
            chat(c)
        assert not isinstance(ei.value, openai.APITimeoutError)
        assert chat(c).choices[0].message.content


@pytest.mark.parametrize("kind", ["invalid_json", "truncated_json"])
def test_bad_json_bodies_raise_json_decode_error(kind):
    # The SDK does not wrap this: httpx's response.json() raises json.JSONDecodeError (a ValueError) as is.
    with FakeOpenAI(faults={0: kind}) as s, sync_client(s) as c:
        with pytest.raises(json.JSONDecodeError):
            chat(c)
    with FakeOpenAI(faults={0: kind}) as s, sync_client(s) as c:
        with pytest.raises(json.JSONDecodeError):
            c.completions.create(model="m", prompt="p")


def test_bad_json_bodies_are_as_specified():
    import httpx2

    with FakeOpenAI(faults={0: "invalid_json", 1: "truncated_json"}) as s:
        body = {"model": "m", "messages": MSG}
        with httpx2.Client() as h:
            r = h.post(s.base_url + "/chat/completions", json=body)
            assert r.status_code == 200 and r.content == b"not json{"
            r = h.post(s.base_url + "/chat/completions", json=body)
            assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
            assert r.content.startswith(b'{"id":"chatcmpl-1"')
            with pytest.raises(json.JSONDecodeError):
                json.loads(r.content)


def test_missing_choices_gives_choices_none():
    # The SDK builds the model without validation: no exception, .choices is None.
    with FakeOpenAI(faults={0: "missing_choices", 1: "missing_choices"}) as s, sync_client(s) as c:
        r = chat(c)
        assert isinstance(r, openai.types.chat.ChatCompletion)
        assert r.choices is None
        assert r.usage.total_tokens == 18
        r = c.completions.create(model="m", prompt="p")
        assert r.choices is None


def test_empty_content_and_length():
    with FakeOpenAI(faults={0: "empty_content", 1: "length", 2: "empty_content", 3: "length"}) as s, \
            sync_client(s) as c:
        r = chat(c)
        assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "stop"
        r = chat(c)
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content
        r = c.completions.create(model="m", prompt="p")
        assert r.choices[0].text == ""
        r = c.completions.create(model="m", prompt="p")
        assert r.choices[0].finish_reason == "length"


def test_fault_callable_sees_index_and_body():
    seen = []

    def faults(n, body):
        seen.append((n, body["model"]))
        return "500" if n % 2 else None

    with FakeOpenAI(faults=faults) as s, sync_client(s) as c:
        chat(c)
        with pytest.raises(openai.InternalServerError):
            chat(c)
        chat(c)
    assert seen == [(0, "teacher-x"), (1, "teacher-x"), (2, "teacher-x")]


def test_sdk_retries_429_honouring_retry_after():
    with FakeOpenAI(faults={0: "429", 1: "429"}, retry_after=0.05) as s:
        with openai.OpenAI(api_key="test", base_url=s.base_url, max_retries=2) as c:
            t0 = time.monotonic()
            assert chat(c).choices[0].message.content
            assert time.monotonic() - t0 < 1.0  # waited Retry-After (0.05 s), not the SDK's default backoff
    assert s.n_completions == 3
    ts = [q["t"] for q in s.requests]
    assert ts[1] - ts[0] >= 0.04 and ts[2] - ts[1] >= 0.04


def test_latency_overlaps_across_concurrent_requests():
    asyncio.run(_test_latency_overlaps_across_concurrent_requests())


async def _test_latency_overlaps_across_concurrent_requests():
    with FakeOpenAI(latency=0.2) as s:
        async with async_client(s) as c:
            await c.chat.completions.create(model="m", messages=MSG)  # warm up the client
            t0 = time.monotonic()
            rs = await asyncio.gather(*(c.chat.completions.create(model="m", messages=[
                {"role": "user", "content": f"q{i}"}]) for i in range(10)))
            dt = time.monotonic() - t0
    assert sorted(r.choices[0].message.content for r in rs) == sorted(f"answer to: q{i}" for i in range(10))
    assert 0.2 <= dt < 1.5, dt  # 10 x 0.2 s in parallel, not 2 s (margin for a loaded machine)


def test_unknown_route_is_404(srv):
    with sync_client(srv) as c:
        with pytest.raises(openai.NotFoundError):
            c.models.list()
        with pytest.raises(openai.NotFoundError):
            c.batches.retrieve("batch_404")


def batch_jsonl(n: int = 3) -> bytes:
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "teacher-x", "messages": [{"role": "user", "content": f"question {i}"}]}}
             for i in range(n)]
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


async def run_batch(c: openai.AsyncOpenAI, data: bytes, max_polls: int = 10):
    f = await c.files.create(file=("in.jsonl", data), purpose="batch")
    assert f.id.startswith("file-") and f.bytes == len(data) and f.filename == "in.jsonl"
    b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b.id.startswith("batch_") and b.input_file_id == f.id
    polls = 0
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        assert polls < max_polls
        b = await c.batches.retrieve(b.id)
        polls += 1

    async def lines(fid):
        if fid is None:
            return []
        return [json.loads(ln) for ln in (await c.files.content(fid)).text.splitlines() if ln.strip()]

    return b, polls, await lines(b.output_file_id), await lines(b.error_file_id)


def test_batch_round_trip():
    asyncio.run(_test_batch_round_trip())


async def _test_batch_round_trip():
    with FakeOpenAI() as s:
        async with async_client(s) as c:
            b, polls, out, err = await run_batch(c, batch_jsonl(3))
    assert b.status == "completed" and polls == 1
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (3, 3, 0)
    assert b.error_file_id is None and err == []
    assert [x["custom_id"] for x in out] == ["req-0", "req-1", "req-2"]
    for i, x in enumerate(out):
        assert x["error"] is None and x["response"]["status_code"] == 200
        body = openai.types.chat.ChatCompletion.model_validate(x["response"]["body"])
        assert body.choices[0].message.content == f"answer to: question {i}"
        assert body.usage.total_tokens == 18
    upload = next(q for q in s.requests if q["path"] == "/v1/files")
    assert upload["headers"]["content-type"].startswith("multipart/form-data")
    assert isinstance(upload["body"], bytes) and batch_jsonl(3) in upload["body"]


def test_batch_fail_goes_to_the_error_file():
    asyncio.run(_test_batch_fail_goes_to_the_error_file())


async def _test_batch_fail_goes_to_the_error_file():
    with FakeOpenAI(batch_fail=lambda cid: cid == "req-1", batch_polls_until_done=3) as s:
        async with async_client(s) as c:
            b, polls, out, err = await run_batch(c, batch_jsonl(3))
    assert b.status == "completed" and polls == 3
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (3, 2, 1)
    assert [x["custom_id"] for x in out] == ["req-0", "req-2"]
    assert [(x["custom_id"], x["response"], x["error"]["code"]) for x in err] == [("req-1", None, "server_error")]


def test_batch_done_on_create_and_expired_sync():
    with FakeOpenAI(batch_polls_until_done=0) as s, sync_client(s) as c:
        f = c.files.create(file=("in.jsonl", batch_jsonl(2)), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert b.status == "completed" and b.request_counts.completed == 2
        assert len(c.files.content(b.output_file_id).text.splitlines()) == 2
    with FakeOpenAI(batch_expire=True) as s, sync_client(s) as c:
        f = c.files.create(file=("in.jsonl", batch_jsonl(2)), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert b.status == "in_progress"
        b = c.batches.retrieve(b.id)
        assert b.status == "expired" and b.output_file_id is None
        assert (b.request_counts.completed, b.request_counts.failed) == (0, 2)
        err = [json.loads(ln) for ln in c.files.content(b.error_file_id).text.splitlines()]
        assert [x["error"]["code"] for x in err] == ["batch_expired"] * 2


# ---------------------------------------------------------------- strict mode: as the real API behaves
# (../shared/reference/real-endpoint-behaviour.md; the messages are OpenAI's, quoted in the reports cited there)


def test_strict_chat_only_refuses_the_legacy_endpoint_for_chat_models_and_the_reverse():
    with FakeOpenAI.strict() as s, sync_client(s) as c:
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model="gpt-4o-mini", prompt="hi", max_tokens=4)
        assert "This is a chat model and not supported in the v1/completions endpoint" in e.value.message
        assert e.value.body["param"] == "model"
        assert c.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", max_tokens=4).choices[0].text
        with pytest.raises(openai.NotFoundError, match="This is not a chat model"):
            c.chat.completions.create(model="davinci-002", messages=MSG)
        r = c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=4)
        assert r.model == "gpt-4o-mini-2024-07-18" and r.system_fingerprint == "fp_fake0001"
    assert s.n_completions == 2  # refused requests are not answered (and take no fault index)


@pytest.mark.parametrize("model", ["o1", "o3-mini", "o4-mini", "gpt-5", "gpt-5.4-mini"])
def test_reasoning_models_refuse_max_tokens_and_non_default_sampling(model):
    with FakeOpenAI() as s, sync_client(s) as c:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=model, messages=MSG, max_tokens=16)
        assert "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' " \
               "instead." == e.value.body["message"] and e.value.code == "unsupported_parameter"
        for name in ("temperature", "top_p"):
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model=model, messages=MSG, max_completion_tokens=16, **{name: 0.7})
            assert e.value.body["message"] == (f"Unsupported value: '{name}' does not support 0.7 with this model. "
                                       "Only the default (1) value is supported.")
        r = c.chat.completions.create(model=model, messages=MSG, max_completion_tokens=16, temperature=1)
        assert r.usage.completion_tokens_details.reasoning_tokens == 64
        assert r.usage.completion_tokens == 7 + 64  # reasoning is billed inside completion_tokens
    # a standard chat model takes them all
    with FakeOpenAI() as s, sync_client(s) as c:
        assert c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=4, temperature=0.7).choices


def test_models_list_unknown_model_and_bad_key():
    key = "sk-proj-" + "a1" * 20
    with FakeOpenAI.strict(models=["gpt-4o-mini", "o4-mini"], api_key=key) as s:
        with openai.OpenAI(api_key=key, base_url=s.base_url, max_retries=0) as c:
            assert [m.id for m in c.models.list()] == ["gpt-4o-mini", "o4-mini"]
            assert c.models.retrieve("o4-mini").id == "o4-mini"
            with pytest.raises(openai.NotFoundError) as e:
                c.models.retrieve("gpt-4o-mnii")
            assert e.value.code == "model_not_found"
            with pytest.raises(openai.NotFoundError) as e:
                c.chat.completions.create(model="gpt-4o-mnii", messages=MSG)
            assert e.value.body["message"] == "The model `gpt-4o-mnii` does not exist or you do not have access to it."
            assert e.value.code == "model_not_found"
        wrong = "sk-proj-" + "zz" * 20
        with openai.OpenAI(api_key=wrong, base_url=s.base_url, max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError) as e:
                c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
            assert e.value.body["message"].startswith("Incorrect API key provided: sk-proj-" + "*" * 20 + "zzzz.")
            assert wrong not in e.value.message
    with FakeOpenAI() as s, sync_client(s) as c:  # not strict: any name is served, no list to enumerate
        with pytest.raises(openai.NotFoundError):
            c.models.list()
        assert c.models.retrieve("anything").id == "anything"
    with FakeOpenAI.strict() as s, sync_client(s) as c:  # strict, no models: no models API at all
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("gpt-4o-mini")
