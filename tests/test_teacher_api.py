"""The API teacher against a loopback server with injected faults: nothing lost, nothing paid twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages.generate import GenerateParams
from stages.lib.llm.backend import make_backend
from stages.lib.llm.cache import ResponseCache, assign_keys
from stages.lib.llm.client import run_requests
from stages.lib.llm.endpoint import ApiParams, Price
from stages.lib.llm.openai_online import TokenBucket
from stages.lib.llm.openai_wire import parse_duration, wait_from_headers
from stages.lib.llm.types import Sampling
from tests.support.fake_openai import FakeOpenAI
from tests.support.params import set_keys
from tests.support.tiny import ROOT

S = Sampling(32, 0.7, 1.0, seed=3)
FAST = dict(backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=1.0)
SECRET = "sk-stillhouse-test-" + "k" * 24


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def backend(server, form="chat", price=None, **limits):
    return make_backend("openai", "teacher-x", form, server.base_url, api=ApiParams(**{**FAST, **limits}), price=price)


def completion_requests(server):
    return [r for r in server.requests if r["path"].endswith("completions")]


def prompts(n, tag="p"):
    return [f"{tag} {i}: say something" for i in range(n)]


def test_parse_rate_limit_headers():
    assert parse_duration("1.5") == 1.5 and parse_duration("20ms") == 0.02 and parse_duration("6m0s") == 360
    assert wait_from_headers({"retry-after": "2"}) == 2
    assert wait_from_headers({"retry-after-ms": "250"}) == 0.25
    assert wait_from_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}) == 1
    assert wait_from_headers({"x-ratelimit-remaining-requests": "5"}) is None


def test_every_fault_is_retried_until_answered(tmp_path):
    faults = {0: "429", 1: "500", 2: "timeout", 3: "drop", 4: "invalid_json", 5: "truncated_json", 6: "missing_choices",
              7: "503"}
    with FakeOpenAI(faults=faults, retry_after=0.05) as server:
        reqs = assign_keys(prompts(6), "t", "chat", S)
        api = backend(server, concurrency=2, max_attempts=10, timeout_s=2.0)
        recs, stats = run_requests(reqs, api, ResponseCache(tmp_path), S)
    assert all(r is not None for r in recs) and stats.failed == 0 and stats.teacher_calls == 6
    # each injected fault cost one retry (a slow machine may add a timeout of its own, never fewer)
    errors = stats.api["errors"]
    assert stats.api["retries"] == sum(errors.values()) >= 8, errors
    assert errors["http_429"] == 1 and errors["http_500"] == 1 and errors["http_503"] == 1, errors
    # a dropped connection may read as a connection error or as a timeout: both are retried
    assert errors.get("timeout", 0) + errors.get("connection", 0) >= 2, errors
    assert sum(v for k, v in errors.items() if k.startswith("malformed")) == 3, errors


def test_exhausted_requests_are_recorded_and_retried_next_run(tmp_path):
    with FakeOpenAI(faults=lambda n, body: "500") as bad:
        reqs = assign_keys(prompts(4), "t", "chat", S)
        recs, stats = run_requests(reqs, backend(bad, max_attempts=3), ResponseCache(tmp_path), S)
        assert len(completion_requests(bad)) == 12
    assert recs == [None] * 4 and stats.failed_by_reason == {"http_500": 4}
    failures = ResponseCache(tmp_path).failures
    assert set(failures) == {r.key for r in reqs} and {f["reason"] for f in failures.values()} == {"http_500"}
    with FakeOpenAI() as good:
        recs, stats = run_requests(reqs, backend(good), ResponseCache(tmp_path), S)
        assert len(completion_requests(good)) == 4
    assert all(recs) and stats.teacher_calls == 4


def test_empty_and_truncated_answers_are_kept_and_counted(tmp_path):
    with FakeOpenAI(faults={0: "empty_content", 1: "length"}) as server:
        reqs = assign_keys(prompts(3), "t", "completion", S)
        recs, stats = run_requests(reqs, backend(server, "completion", concurrency=1), ResponseCache(tmp_path), S)
    assert sorted(r["text"] == "" for r in recs) == [False, False, True]
    assert stats.by_finish == {"stop": 2, "length": 1} and stats.failed == 0


def test_retry_after_pauses_every_request(tmp_path):
    with FakeOpenAI(faults={0: "429"}, retry_after=0.4, latency=0.01) as server:
        reqs = assign_keys(prompts(5), "t", "chat", S)
        run_requests(reqs, backend(server, concurrency=1), ResponseCache(tmp_path), S)
        times = [r["t"] for r in completion_requests(server)]
    assert len(times) == 6
    assert times[1] - times[0] >= 0.38  # nothing was sent during the Retry-After window


def test_request_rate_limit_holds(tmp_path):
    n, rpm = 50, 1200  # 20/s, bucket of 20
    with FakeOpenAI() as server:
        reqs = assign_keys(prompts(n), "t", "chat", S)
        t0 = time.monotonic()
        run_requests(reqs, backend(server, concurrency=64, requests_per_minute=rpm), ResponseCache(tmp_path), S)
        elapsed = time.monotonic() - t0
        times = sorted(r["t"] for r in completion_requests(server))
    expected = (n - 20) / 20  # after the first full bucket
    assert expected * 0.9 <= elapsed <= expected + 1.5
    for i, t in enumerate(times):  # any 1 s window holds at most the bucket plus one second of refill
        assert sum(1 for u in times[i:] if u - t < 1.0) <= 20 + 20 + 1


def test_token_bucket_refills_at_its_rate():
    import asyncio

    async def go():
        b = TokenBucket(per_minute=600)  # 10/s, capacity 10
        t0 = time.monotonic()
        for _ in range(25):
            await b.take(1)
        return time.monotonic() - t0

    assert 1.35 <= asyncio.run(go()) <= 3.0  # never faster than the rate; a loaded machine may be slower


def test_budget_stops_before_it_is_exceeded(tmp_path):
    price = Price(input_per_million=1000.0, output_per_million=1000.0)
    sample = "p 0: say something"
    worst = price.cost(len(sample.encode()), S.max_new_tokens)  # the client's per-request estimate
    with FakeOpenAI(usage=(10, 30)) as server:  # each call costs 0.04, the worst case 0.05
        reqs = assign_keys(prompts(10), "t", "chat", S)
        api = backend(server, price=price, concurrency=1, max_cost_usd=worst * 3.5)
        recs, stats = run_requests(reqs, api, ResponseCache(tmp_path), S, price)
        sent = len(completion_requests(server))
    assert stats.prompt_tokens == sent * 10 and stats.completion_tokens == sent * 30  # counted once, by the client
    assert price.cost(stats.prompt_tokens, stats.completion_tokens) <= worst * 3.5
    assert api.spent_usd == pytest.approx(sent * price.cost(10, 30))
    assert sent == 4 and stats.failed_by_reason == {"budget": 6}


def test_batch_api_round_trip(tmp_path):
    with FakeOpenAI(batch_fail=lambda custom_id: custom_id == failing) as server:
        reqs = assign_keys(prompts(5), "t", "chat", S)
        failing = reqs[2].key
        cache_dir = tmp_path / "cache"
        recs, stats = run_requests(reqs, backend(server), ResponseCache(cache_dir), S, batch_api=True)
        assert recs == [None] * 5 and stats.batch["submitted"] == 5 and len(stats.batch["running"]) == 1
        assert completion_requests(server) == []  # nothing went through the synchronous endpoint
        # next run: the job is done; four answers collected, the failed one resubmitted alone
        recs, stats = run_requests(reqs, backend(server), ResponseCache(cache_dir), S, batch_api=True)
        assert sum(r is not None for r in recs) == 4 and stats.batch["collected"] == 4
        assert stats.failed_by_reason == {"batch:server_error": 1} and stats.batch["submitted"] == 1
        uploads = [r for r in server.requests if r["path"].endswith("/files")]
        last_upload = json.dumps(uploads[-1]["body"], default=str)
        assert failing in last_upload and reqs[0].key not in last_upload
        # the resubmitted request now fails no more: collected, then a rerun sends nothing at all
        failing = None
        recs, stats = run_requests(reqs, backend(server), ResponseCache(cache_dir), S, batch_api=True)
        assert all(recs) and stats.batch["collected"] == 1 and stats.batch["submitted"] == 0
        n = len(server.requests)
        recs, stats = run_requests(reqs, backend(server), ResponseCache(cache_dir), S, batch_api=True)
        assert all(recs) and stats.cache_hits == 5 and len(server.requests) == n
    text = "".join(p.read_text() for p in cache_dir.iterdir())
    assert SECRET not in text


# ---------------------------------------------------------------- the generate stage, killed mid-run


def stage_env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": SECRET}


def setup_project(tmp_path: Path, base_url: str, **generate) -> Path:
    (tmp_path / "seeds" / "prompts").mkdir(parents=True)
    for f in ("seed_tasks.jsonl", "prompts/generate_prompt.txt"):
        (tmp_path / "seeds" / f).write_bytes((ROOT / "seeds" / f).read_bytes())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    set_keys(params["generate"], GenerateParams, **{"backend": "openai", "model": "teacher-x", "base_url": base_url,
                                                    "prompt_form": "chat", **generate})
    # generate also reads filter's rule params (self-instruct's bootstrap)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({k: params[k] for k in ("seeds", "generate", "filter")}))
    subprocess.run([sys.executable, "-m", "stages.seeds"], cwd=tmp_path, env=stage_env(), check=True,
                   capture_output=True)
    return tmp_path


def cached_prompts(cache: Path) -> set[str]:
    """The user message of every cached answer (chat prompts are cached as [system, user])."""
    out = set()
    for f in cache.glob("responses-*.jsonl"):
        for line in f.read_text().splitlines():
            try:
                prompt = json.loads(line)["prompt"]
                out.add(prompt if isinstance(prompt, str) else prompt[-1])
            except (json.JSONDecodeError, KeyError):
                pass
    return out


@pytest.mark.e2e  # runs the stage in subprocesses: 30 s to 2 min on 2 cores
def test_kill_9_mid_run_loses_nothing_and_repays_nothing(tmp_path):
    # a models list: the endpoint check sends no completion
    with FakeOpenAI(latency=0.1, models=["teacher-x"]) as server:
        proj = setup_project(tmp_path, server.base_url, num_requests=60, concurrency=4)
        proc = subprocess.Popen([sys.executable, "-m", "stages.generate"], cwd=proj, env=stage_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cache = proj / "data" / "teacher_cache"
        deadline = time.monotonic() + 60
        while len(cached_prompts(cache)) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        answered = cached_prompts(cache)
        sent_before = len(completion_requests(server))
        assert 12 <= len(answered) < 60 and not (proj / "data" / "generated").exists()
        # in flight at the kill: at most the concurrency cap was lost
        assert sent_before - len(answered) <= 4

        out = subprocess.run([sys.executable, "-m", "stages.generate"], cwd=proj, env=stage_env(), capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr
        resent = completion_requests(server)[sent_before:]
        resent_prompts = [r["body"]["messages"][-1]["content"] for r in resent]
    assert not set(resent_prompts) & answered
    assert len(resent_prompts) == 60 - len(answered)
    metrics = json.loads((proj / "metrics" / "generate.json").read_text())
    assert metrics["cache_hits"] == len(answered) and metrics["teacher_calls"] == 60 - len(answered)
    # same seeds, params and cache: byte-identical shards, and no request at all
    shards = {p.name: p.read_bytes() for p in (proj / "data" / "generated").iterdir()}
    n_sent = len(server.requests)
    out = subprocess.run([sys.executable, "-m", "stages.generate"], cwd=proj, env=stage_env(), capture_output=True)
    assert out.returncode == 0 and len(server.requests) == n_sent
    assert {p.name: p.read_bytes() for p in (proj / "data" / "generated").iterdir()} == shards
    for path in proj.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.e2e  # runs the stage in subprocesses: 30 s to 2 min on 2 cores
def test_stage_fails_above_the_failure_rate_then_retries_only_the_failed(tmp_path):
    with FakeOpenAI(faults=lambda n, body: "500", models=["teacher-x"]) as bad:
        proj = setup_project(tmp_path, bad.base_url, num_requests=5, max_attempts=2, max_failure_rate=0.2)
        out = subprocess.run([sys.executable, "-m", "stages.generate"], cwd=proj, env=stage_env(), capture_output=True,
                             text=True)
    assert out.returncode == 1
    assert "5 of 5 requests failed {'http_500': 5}" in out.stderr and "rerun to retry only those" in out.stderr
    assert "the server said: http_500: injected 500" in out.stderr  # the server's words reach the error line
    assert not (proj / "data" / "generated").exists()
    with FakeOpenAI(models=["teacher-x"]) as good:
        params = yaml.safe_load((proj / "params.yaml").read_text())
        params["generate"]["teacher"]["base_url"] = good.base_url
        (proj / "params.yaml").write_text(yaml.safe_dump(params))
        out = subprocess.run([sys.executable, "-m", "stages.generate"], cwd=proj, env=stage_env(), capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr
        assert len(completion_requests(good)) == 5


def test_expired_batch_is_resubmitted(tmp_path):
    reqs = assign_keys(prompts(3), "t", "chat", S)
    with FakeOpenAI(batch_expire=True) as server:
        run_requests(reqs, backend(server), ResponseCache(tmp_path), S, batch_api=True)
        recs, stats = run_requests(reqs, backend(server), ResponseCache(tmp_path), S, batch_api=True)
        assert recs == [None] * 3 and stats.failed_by_reason == {"batch:batch_expired": 3}
        assert stats.batch["submitted"] == 3  # all of them again, in a new job
        assert len([r for r in server.requests if r["path"] == "/v1/batches" and r["method"] == "POST"]) == 2


def test_default_endpoint_is_used_and_the_cache_key_names_only_the_model():
    b = make_backend("openai", "gpt-4o-mini", "chat", None)
    assert b.teacher_id == "openai:gpt-4o-mini"  # at OpenAI's own endpoint: the keys of earlier versions
    assert str(b.batch_client().base_url).rstrip("/") == "https://api.openai.com/v1"
    assert b.base_url == "https://api.openai.com/v1"


# ------------------------------------------------- errors users can act on, and reasoning models, at the stage


def no_secret_on_disk(proj: Path) -> None:
    for path in proj.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("case", ["model", "key"])
def test_a_wrong_model_or_key_stops_the_stage_with_the_servers_words(tmp_path, case):
    """The stage stops at the endpoint check, before any paid request; its error line and its metrics
    carry the server's message, and the key is in no file."""
    key = SECRET if case == "model" else "sk-other-" + "o" * 30
    with FakeOpenAI.strict(models=["gpt-4o-mini"], api_key=key) as srv:
        proj = setup_project(tmp_path, srv.base_url, num_requests=8)
        params = yaml.safe_load((proj / "params.yaml").read_text())
        params["generate"]["teacher"]["model"] = "gpt-4o-mnii" if case == "model" else "gpt-4o-mini"
        (proj / "params.yaml").write_text(yaml.safe_dump(params))
        out = subprocess.run([sys.executable, "-m", "stages.generate"], cwd=proj, env=stage_env(), capture_output=True,
                             text=True)
    assert out.returncode == 1
    error_line = [ln for ln in out.stderr.splitlines() if "ERROR" in ln]
    want = ("The model `gpt-4o-mnii` does not exist or you do not have access to it." if case == "model"
            else "Incorrect API key provided: sk-[redacted]")
    assert len(error_line) == 1 and want in error_line[0], out.stderr
    metrics = json.loads((proj / "metrics/generate.json").read_text())
    assert want in metrics["error"] and metrics["teacher_calls"] == 0
    assert not completion_requests(srv)  # nothing paid: GET /models/{model} settled it
    assert SECRET not in out.stderr and SECRET not in out.stdout
    no_secret_on_disk(proj)


def test_a_fatal_error_mid_run_stops_before_spending_on_the_rest(tmp_path):
    """The check passes (the model is listed), then the endpoint refuses the first request with 400 (the
    standard request shape forced on o4-mini): not retried, the rest never sent, the message in the
    stage's error line and metrics."""
    with FakeOpenAI.strict(models=["o4-mini"], api_key=SECRET) as srv:
        proj = setup_project(tmp_path, srv.base_url, num_requests=12, concurrency=1, model="o4-mini",
                             model_family="standard")
        out = subprocess.run([sys.executable, "-m", "stages.generate"], cwd=proj, env=stage_env(), capture_output=True,
                             text=True)
    assert out.returncode == 1, out.stderr
    assert len(completion_requests(srv)) == 1  # the first 400: not retried, the other 11 never sent
    line = [ln for ln in out.stderr.splitlines() if "ERROR" in ln][0]
    assert "HTTP 400 Unsupported parameter: 'max_tokens' is not supported with this model." in line
    assert "11 queued requests were not sent" in line
    metrics = json.loads((proj / "metrics/generate.json").read_text())
    assert "Unsupported parameter" in metrics["error"] and metrics["api_errors"] == {"http_400": 1}
    assert "Unsupported parameter" in metrics["api_error_messages"]["http_400"]
    failures = [json.loads(ln) for f in (proj / "data/teacher_cache").glob("failures-*.jsonl")
                for ln in f.read_text().splitlines()]
    assert len(failures) == 1 and "Use 'max_completion_tokens' instead." in failures[0]["message"]
    no_secret_on_disk(proj)


def test_the_stage_on_a_reasoning_model(tmp_path):
    """generate with model o4-mini against a server that refuses max_tokens and temperature as OpenAI does."""
    with FakeOpenAI.strict(models=["o4-mini"], api_key=SECRET, reasoning_tokens=40) as srv:
        proj = setup_project(tmp_path, srv.base_url, num_requests=4, model="o4-mini",
                             extra_body={"reasoning_effort": "low"}, reasoning_budget=500,
                             prices={"o4-mini": {"input_per_million": 1.1, "output_per_million": 4.4}})
        out = subprocess.run([sys.executable, "-m", "stages.generate"], cwd=proj, env=stage_env(), capture_output=True,
                             text=True)
    assert out.returncode == 0, out.stderr
    sent = completion_requests(srv)
    assert len(sent) == 4
    for r in sent:
        assert r["body"]["max_completion_tokens"] == 192 + 500 and r["body"]["reasoning_effort"] == "low"
        assert not {"max_tokens", "temperature", "top_p", "stop"} & set(r["body"])
    m = json.loads((proj / "metrics/generate.json").read_text())
    assert m["reasoning_tokens_called"] == 4 * 40 and m["completion_tokens_called"] == 4 * (7 + 40)
    assert m["cost_usd_called"] == round((4 * 11 * 1.1 + 4 * 47 * 4.4) / 1e6, 6)  # reasoning billed as output
