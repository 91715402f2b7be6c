"""The response cache and the teacher store: what a request's identity is, what is reused, what survives.

Against the loopback FakeOpenAI; each test has its own store (conftest's `teacher_store`).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
from dataclasses import asdict

import pytest

from stages.lib.errors import StageError
from stages.lib.llm.backend import make_backend
from stages.lib.llm.cache import ResponseCache, assign_keys, request_key
from stages.lib.llm.client import ModelClient, run_requests
from stages.lib.llm.endpoint import ApiParams
from stages.lib.llm.store import STORE_ENV, TeacherStore, store_dir
from stages.lib.llm.types import Sampling
from tests.support.fake_openai import FakeOpenAI, _last_user_text

S = Sampling(64, 0.7, 1.0, seed=3)
FAST = ApiParams(concurrency=2, max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=5.0)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


def api(server, model="teacher-x", form="chat"):
    return make_backend("openai", model, form, server.base_url, api=FAST)


def sent(server) -> list[str]:
    """The prompts of the completion requests the server received, in order."""
    return [_last_user_text(r["body"]) for r in server.requests if r["path"].endswith("completions")]


def prompts(n, tag="p"):
    return [f"{tag} {i}: say something" for i in range(n)]


def ask(server, cache, ps, sampling=S, model="teacher-x", teacher_id=None):
    session = ModelClient(lambda form: api(server, model, form), cache, teacher_id=teacher_id)
    return session.ask(ps, sampling, "chat"), session.stats


# ---------------------------------------------------------------- identity


def test_key_format_of_the_committed_build_is_unchanged():
    """Local default keys (and so dvc.lock's data hashes) must stay what they were: sha256 over this payload."""
    s = Sampling(192, 0.7, 0.9, seed=42)
    payload = {"teacher": "local:abc", "form": "completion", "prompt": "Tell a story", "sampling": asdict(s), "draw": 1}
    old = hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    assert request_key("local:abc", "completion", "Tell a story", s, 1) == old
    assert assign_keys(["Tell a story"] * 2, "local:abc", "completion", s)[1].key == old
    # extra request fields (a system prompt) are part of the key, and only when set
    assert request_key("local:abc", "completion", "Tell a story", s, 1, {"system": "Be brief."}) != old
    # identity ignores the token limit only
    a = assign_keys(["x"], "t", "chat", s)[0]
    assert a.identity == assign_keys(["x"], "t", "chat", Sampling(999, 0.7, 0.9, seed=42))[0].identity
    assert a.identity != assign_keys(["x"], "t", "chat", Sampling(192, 0.7, 0.9, seed=43))[0].identity
    assert a.identity != assign_keys(["x"], "t2", "chat", s)[0].identity


def test_another_endpoint_is_asked_again_unless_a_teacher_id_declares_them_the_same(tmp_path):
    """Two servers that both serve `teacher-x` never share answers (issue 22: the old code served b a's
    answers); a `teacher_id` the user gives both declares them the same."""
    ps = prompts(4)
    with FakeOpenAI() as a, FakeOpenAI() as b:
        recs, _ = ask(a, ResponseCache(tmp_path / "c"), ps)
        assert len(sent(a)) == 4 and all(recs) and {r["endpoint"] for r in recs} == {a.base_url}
        recs_b, st = ask(b, ResponseCache(tmp_path / "c"), ps)  # the same model name behind another host
        assert len(sent(b)) == 4 and st.cache_hits == 0 and {r["endpoint"] for r in recs_b} == {b.base_url}
        _, st = ask(b, ResponseCache(tmp_path / "c"), ps)  # each endpoint's own answers are served to it
        _, st_a = ask(a, ResponseCache(tmp_path / "c"), ps)
        assert len(sent(b)) == 4 and st.cache_hits == 4 and len(sent(a)) == 4 and st_a.cache_hits == 4
        ask(b, ResponseCache(tmp_path / "c"), ps, model="teacher-y")  # another model: asked again
        assert len(sent(b)) == 8
        _, st = ask(b, ResponseCache(tmp_path / "c"), ps, teacher_id="teacher-x@vendor-2")
        assert len(sent(b)) == 12 and st.teacher_calls == 4
        _, st = ask(a, ResponseCache(tmp_path / "c"), ps, teacher_id="teacher-x@vendor-2")  # the same explicit id
        assert len(sent(a)) == 4 and st.cache_hits == 4


def test_records_keyed_with_the_url_by_earlier_versions_are_still_read(tmp_path):
    """Before, API keys used `openai:<base_url>:<model>`; such a cache must still answer."""
    ps = prompts(3)
    with FakeOpenAI() as server:
        tid = f"openai:{server.base_url}:teacher-x"
        cache = ResponseCache(tmp_path / "c")
        for r in assign_keys(ps, tid, "chat", S):  # records as the old code wrote them: no identity, no form
            cache.put({"key": r.key, "teacher": "teacher-x", "teacher_id": tid, "prompt": r.prompt,
                       "sampling": asdict(S), "draw": r.draw, "text": f"old answer {r.prompt}",
                       "finish_reason": "length",
                       "prompt_tokens": 5, "completion_tokens": 64, "response_id": "r",
                       "created": "2025-01-01T00:00:00Z"})
        cache.close()
        recs, st = ask(server, ResponseCache(tmp_path / "c"), ps)
        assert sent(server) == [] and [r["text"] for r in recs] == [f"old answer {p}" for p in ps]
        assert all(r["reused_from"] for r in recs)


def test_raising_max_new_tokens_asks_again_only_for_truncated_answers(tmp_path):
    ps = prompts(6)
    cut = {p for p in ps[::3]}  # these hit the limit
    with FakeOpenAI(faults=lambda n, body: "length" if _last_user_text(body) in cut else None) as server:
        first, _ = ask(server, ResponseCache(tmp_path / "c"), ps)
        assert [r["finish_reason"] for r in first].count("length") == 2 and len(sent(server)) == 6
        bigger = Sampling(256, S.temperature, S.top_p, S.stop, S.seed)
        recs, st = ask(server, ResponseCache(tmp_path / "c"), ps, bigger)
        assert sorted(sent(server)[6:]) == sorted(cut) and st.teacher_calls == 2 and st.cache_hits == 4
        reused = [r for r in recs if r.get("reused_from")]
        assert {r["prompt"] for r in reused} == set(ps) - cut
        keys = assign_keys(ps, f"openai:teacher-x@{server.base_url}", "chat", bigger)
        assert all(r["key"] == q.key for r, q in zip(recs, keys))
        _, st = ask(server, ResponseCache(tmp_path / "c"), ps, bigger)  # now all exact hits
        assert len(sent(server)) == 8 and st.cache_hits == 6
        # a lower limit: answers that stopped within it are reused, longer or cut ones are not
        smaller = Sampling(5, S.temperature, S.top_p, S.stop, S.seed)  # the fake reports 7 completion tokens
        _, st = ask(server, ResponseCache(tmp_path / "c"), ps, smaller)
        assert len(sent(server)) == 14


# ---------------------------------------------------------------- the store outside the workspace


def test_store_answers_when_the_workspace_cache_is_gone(tmp_path, teacher_store):
    ps = prompts(5)
    store = TeacherStore(teacher_store)
    with FakeOpenAI() as server:
        ask(server, ResponseCache(tmp_path / "ws1/cache", store=store), ps[:3])
        shutil.rmtree(tmp_path / "ws1")  # what DVC does to a failed --temp experiment
        recs, st = ask(server, ResponseCache(tmp_path / "ws2/cache", store=TeacherStore(teacher_store)), ps)
        # requests go out concurrently: compare the set sent in the second workspace, not their order
        assert sorted(sent(server)[3:]) == sorted(ps[3:]) and len(sent(server)) == 5
        assert st.cache_hits == 3 and all(recs)
    # what the store answered is now in the DVC-tracked cache too (that is what `dvc push` sends)
    assert len(ResponseCache(tmp_path / "ws2/cache").entries) == 5
    assert not list(teacher_store.rglob("*.tmp"))


def test_batch_job_ids_outlive_the_workspace(tmp_path, teacher_store):
    ps = prompts(4)
    reqs = assign_keys(ps, "openai:teacher-x", "chat", S)
    with FakeOpenAI() as server:
        cache = ResponseCache(tmp_path / "ws1", store=TeacherStore(teacher_store))
        recs, st = run_requests(reqs, api(server), cache, S, batch_api=True)
        assert st.batch["submitted"] == 4 and recs == [None] * 4
        shutil.rmtree(tmp_path / "ws1")
        cache = ResponseCache(tmp_path / "ws2", store=TeacherStore(teacher_store))
        recs, st = run_requests(reqs, api(server), cache, S, batch_api=True)
        assert all(recs) and st.batch["collected"] == 4 and st.batch["submitted"] == 0
        assert len([r for r in server.requests if r["path"] == "/v1/batches" and r["method"] == "POST"]) == 1
        # collected: a third workspace neither polls nor resubmits
        n = len(server.requests)
        cache = ResponseCache(tmp_path / "ws3", store=TeacherStore(teacher_store))
        recs, st = run_requests(reqs, api(server), cache, S, batch_api=True)
        assert all(recs) and st.cache_hits == 4 and len(server.requests) == n


def _writer(root: str, start: int, n: int) -> None:
    store = TeacherStore(root)
    for i in range(start, start + n):
        store.put({"key": f"k{i:04d}", "identity": f"id{i % 7}", "text": f"answer {i}" * 50})


def test_two_writers_at_once_leave_every_record_whole(teacher_store):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(teacher_store), s, 300)) for s in (0, 150)]  # 150 keys overlap
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = TeacherStore(teacher_store)
    got = {r["key"] for i in range(7) for r in store.candidates(f"id{i}")}
    assert got == {f"k{i:04d}" for i in range(450)}
    assert store.get("id3", "k0003")["text"] == "answer 3" * 50
    assert not list(teacher_store.rglob("*.tmp")) and not list(teacher_store.rglob(".*"))


def test_store_location(monkeypatch, tmp_path):
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "env"))
    assert store_dir(None) == tmp_path / "env" and store_dir(str(tmp_path / "p")) == tmp_path / "p"
    monkeypatch.delenv(STORE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store_dir(None) == tmp_path / "xdg/stillhouse/teacher"
    with pytest.raises(StageError, match="absolute"):
        store_dir("relative/store")


# ---------------------------------------------------------------- replies from the wild


def test_wild_replies_are_repaired_and_survive_a_reload(tmp_path, teacher_store):
    wild = {"p 0: say something": "lone \ud800 surrogate", "p 1: say something": "NUL\x00 inside",
            "p 2: say something": "line\u2028separator", "p 3: say something": "big " * 1_300_000}  # 5.2 MB
    with FakeOpenAI(reply=lambda body: wild[_last_user_text(body)]) as server:  # JSON escapes, as servers send them
        recs, st = ask(server, ResponseCache(tmp_path / "c", store=TeacherStore(teacher_store)), list(wild))
    assert st.failed == 0
    texts = ["lone \ufffd surrogate", "NUL inside", "line\u2028separator", "big " * 1_300_000]
    assert [r["text"] for r in recs] == texts
    again = ResponseCache(tmp_path / "c")  # the JSONL cache reads back whole (U+2028 is no line break in it)
    assert [again.get(r["key"])["text"] for r in recs] == texts
    store = TeacherStore(teacher_store)
    assert [store.get(r["identity"], r["key"])["text"] for r in recs] == texts
