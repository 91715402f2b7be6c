"""End to end: `dvc repro` with selection on, the judge a loopback OpenAI-compatible server.

seeds -> generate (self_instruct) -> filter -> select (AlpaGasus rating) -> ingest as DVC stages
against `tests/fake_openai.FakeOpenAI`; the fake rates each example from a hash of its text, and
answers one rating prompt in six with no number (an unknown verdict). Then only the threshold
changes: select and ingest rerun, every rating comes from the cache (no request reaches the
server) and fewer rows are kept.
"""

from __future__ import annotations

import json

import polars as pl
import pytest
import yaml

from stages.lib.selection.rating import SYSTEM
from tests.support.e2e import ran, sh
from tests.support.fake_openai import FakeOpenAI, _last_user_text
from tests.support.method_teacher import make_repo, reply

pytestmark = pytest.mark.e2e

VERDICTS = ["Score: 5/5", "4.5\nAccurate.", "**4**", "I'd give it a 3", "2", "The response is fine."]


RATED: dict[str, str] = {}


def judge_or_teacher(body: dict) -> str:
    """Rating prompts get the verdicts in turn (each verdict once in every 6 new prompts; a repeat the same)."""
    text = _last_user_text(body)
    if text.startswith(SYSTEM):
        return RATED.setdefault(text, VERDICTS[len(RATED) % len(VERDICTS)])
    return reply(body)


def set_select(repo, **values) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["select"].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_selection_threshold_sweep_reruns_select_from_the_cache(tmp_path):
    with FakeOpenAI(reply=judge_or_teacher) as srv:
        repo = make_repo(tmp_path, srv, {"method": "self_instruct", "num_requests": 4,
                                         "self_instruct": {"requests_per_round": 2}})
        set_select(repo, method="rating", policy={"score": "rating", "threshold": 4.0},
                   judge={"backend": "openai", "model": "fake-judge", "base_url": srv.base_url, "prompt_form": "chat"})
        for stage in ["seeds", "generate", "filter", "select", "ingest"]:
            assert ran(sh(repo, "dvc", "repro", "-s", stage)) == [stage]
        filtered = pl.read_parquet(repo / "data/filtered/kept-00000.parquet")
        kept = pl.read_parquet(repo / "data/selected/kept-00000.parquet")
        rejected = pl.read_parquet(repo / "data/selected/rejected-00000.parquet")
        m = json.loads((repo / "metrics/select.json").read_text())
        n = filtered.height
        assert n > 6 and kept.height + rejected.height == n == m["rows"]
        # the endpoint check's GET /models/{model} has no body: count the completion requests only
        ratings = [r for r in srv.requests
                   if r["path"].endswith("completions") and _last_user_text(r["body"]).startswith(SYSTEM)]
        assert m["judge"]["calls"] == m["judge"]["requests"] == len(ratings) == n
        assert all(x >= 4.0 for x in kept["rating"]) and kept.height == m["kept"] > 0
        unknown = rejected.filter(pl.col("rating").is_null())
        assert unknown.height == m["judge"]["unknown"] > 0  # "The response is fine." is unknown, not 0
        assert set(unknown["reason"]) == {"unknown_rating"} and set(unknown["rating_raw"]) == {VERDICTS[-1]}
        assert set(rejected.filter(pl.col("rating").is_not_null())["reason"]) == {"rating_below_threshold"}
        ingest = json.loads((repo / "metrics/ingest.json").read_text())
        assert ingest["sources"]["generated"]["read"] == kept.height  # ingest reads the selected rows

        sent = len(srv.requests)
        set_select(repo, policy={"score": "rating", "threshold": 4.5})
        status = sh(repo, "dvc", "status").stdout
        assert "select:" in status and "filter:" not in status and "generate:" not in status
        for stage in ["select", "ingest"]:
            assert ran(sh(repo, "dvc", "repro", "-s", stage)) == [stage]
        m2 = json.loads((repo / "metrics/select.json").read_text())
        assert len(srv.requests) == sent and m2["judge"]["calls"] == 0 and m2["judge"]["cache_hits"] == n
        kept2 = pl.read_parquet(repo / "data/selected/kept-00000.parquet")
        assert all(x >= 4.5 for x in kept2["rating"]) and kept2.height == m2["kept"] < kept.height
        assert json.loads((repo / "metrics/ingest.json").read_text())["sources"]["generated"]["read"] == kept2.height
