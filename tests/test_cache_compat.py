"""A teacher cache and store written by the code before the llm package (tests/golden/old_cache, see its
README) serve every answer with 0 new calls: the keys, the record format, the store layout and the Batch
job ledger are read as they were written.

The old records carry no endpoint. They were written against a loopback server, but an old record
keyed `openai:<model>` is taken to come from OpenAI's own endpoint (docs/teacher-cache.md): it is served
to requests to api.openai.com, and to another server only through a declared `teacher_id`. (The old code
served it to any server with that model name: the unsafe behaviour issue 22 removes.)"""

from __future__ import annotations

import json
import shutil

import pytest

from stages.lib.llm.backend import make_backend
from stages.lib.llm.cache import ResponseCache
from stages.lib.llm.client import ModelClient
from stages.lib.llm.endpoint import ApiParams
from stages.lib.llm.openai_wire import RequestOptions
from stages.lib.llm.store import TeacherStore
from stages.lib.llm.types import Sampling
from tests.support.fake_openai import FakeOpenAI
from tests.support.tiny import ROOT

OLD = ROOT / "tests/golden/old_cache"
CASES = json.loads((OLD / "expected.json").read_text())
FAST = ApiParams(concurrency=2, max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=5.0)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


def ask_again(case: dict, srv: FakeOpenAI, cache: ResponseCache, base_url: str | None = None) -> list[dict | None]:
    """The old run's requests, asked by the current client at `base_url` (OpenAI's own endpoint: None)."""
    options = RequestOptions(**case["options"]) if case["options"] else None
    s = case["sampling"]
    client = ModelClient(lambda form: make_backend("openai", case["model"], form, base_url, api=FAST,
                                                   options=options),
                         cache, batch_api=case["batch_api"], teacher_id=case["teacher_id"])
    prompts = [p if isinstance(p, str) else tuple(p) for p in case["prompts"]]
    return client.ask(prompts, Sampling(s["max_new_tokens"], s["temperature"], s["top_p"], tuple(s["stop"]), s["seed"]),
                      case["form"])


@pytest.mark.parametrize("where", ["workspace", "store"])
def test_an_old_cache_or_store_serves_every_answer_with_no_call(tmp_path, where):
    """`workspace`: the old workspace cache alone (no store); `store`: an empty workspace over the old store
    (a `dvc exp run --temp` workspace, or a fresh clone)."""
    shutil.copytree(OLD, tmp_path / "old")
    with FakeOpenAI() as srv:
        for name, case in sorted(CASES.items()):
            cache = (ResponseCache(tmp_path / "old/workspace") if where == "workspace" else
                     ResponseCache(tmp_path / f"ws-{name}", store=TeacherStore(tmp_path / "old/store")))
            url = srv.base_url if case["teacher_id"] else None  # a declared teacher_id: any endpoint
            recs = ask_again(case, srv, cache, url)
            assert [[r["key"], r["text"]] for r in recs] == case["answers"], name
        assert srv.requests == []  # not even the endpoint check, nor a Batch job retrieved again


@pytest.mark.parametrize("where", ["workspace", "store"])
def test_an_old_record_is_not_served_to_another_server_with_the_same_model_name(tmp_path, where):
    shutil.copytree(OLD, tmp_path / "old")
    case = CASES["chat"]
    with FakeOpenAI() as srv:
        cache = (ResponseCache(tmp_path / "old/workspace") if where == "workspace" else
                 ResponseCache(tmp_path / "ws", store=TeacherStore(tmp_path / "old/store")))
        recs = ask_again(case, srv, cache, srv.base_url)
        completions = [r for r in srv.requests if r["path"].endswith("/chat/completions")]
        assert len(completions) == len(case["prompts"]) and all(r["endpoint"] == srv.base_url for r in recs)


def test_the_old_batch_ledger_is_read_as_collected(tmp_path):
    shutil.copytree(OLD, tmp_path / "old")
    for cache in (ResponseCache(tmp_path / "old/workspace"),
                  ResponseCache(tmp_path / "empty", store=TeacherStore(tmp_path / "old/store"))):
        assert cache.ledger.open_jobs() == []
    # an old ledger's job with its done mark removed is open again, as it was recorded
    for f in (tmp_path / "old/workspace").glob("batches-*.jsonl"):
        f.write_text("".join(ln + "\n" for ln in f.read_text().splitlines() if '"done"' not in ln))
    (job,) = ResponseCache(tmp_path / "old/workspace").ledger.open_jobs()
    assert job["batch_id"] == "batch_1" and len(job["custom_ids"]) == 2 and job["input_file_id"]
