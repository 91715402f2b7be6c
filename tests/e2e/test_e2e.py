"""End to end: `dvc repro` in a fresh git repo, on the embedded teacher and a tiny random student.

Checks every output, that a second repro runs nothing, that an evaluate param reruns only
evaluate, that a filter param reruns filter and what follows with zero teacher calls, and
that bad seeds stop the pipeline before anything downstream runs. The tiny pipeline is built once
per session (`e2e_build`, shared with tests/e2e/test_e2e_remote.py); each test that changes the project
works on its own full copy (`e2e_copy`), so the tests run in any order.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from tests.support.e2e import ran, set_params, sh

pytestmark = pytest.mark.e2e


@pytest.fixture
def repo(e2e_build) -> Path:
    """The shared tiny build, to read only (tests that change the project take `e2e_copy`)."""
    return e2e_build.repo


def test_first_repro_builds_every_output(e2e_build):
    repo = e2e_build.repo
    first = ran(e2e_build.first_repro)  # teacher_model ran before, to make the tiny student's tokenizer
    assert sorted(first) == sorted(["seeds", "prune", "generate", "filter", "select", "ingest", "tokenize", "capture",
                                    "train", "evaluate", "report"])
    order = ["seeds", "generate", "filter", "select", "ingest", "tokenize", "capture", "train", "evaluate", "report"]
    assert [s for s in first if s in order] == order and first.index("prune") < first.index("select")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"seeds", "teacher_model", "prune", "generate", "filter", "select", "ingest",
                                   "tokenize", "capture", "train", "evaluate", "report"}
    assert json.loads((repo / "metrics/capture.json").read_text()) == {"captured": False}  # objective ce
    assert json.loads((repo / "metrics/prune.json").read_text())["layers_kept"] == 1

    seeds = pl.read_parquet(repo / "data/seeds/part-00000.parquet")
    assert seeds.height >= 175
    assert (repo / "models/teacher/model.safetensors").exists() and (repo / "models/teacher/tokenizer.json").exists()

    gen = pl.read_parquet(repo / "data/generated/tasks-00000.parquet")
    metrics = json.loads((repo / "metrics/generate.json").read_text())
    assert metrics["teacher_calls"] == 8 and metrics["items_parsed"] == gen.height > 0
    assert {"prompt_hash", "teacher_model", "sampling", "response_id", "cache_key"} <= set(gen.columns)
    assert list(gen["request_index"]) == sorted(gen["request_index"])
    assert list((repo / "data/teacher_cache").glob("responses-*.jsonl"))

    kept = pl.read_parquet(repo / "data/filtered/kept-00000.parquet")
    rejected = pl.read_parquet(repo / "data/filtered/rejected-00000.parquet")
    fm = json.loads((repo / "metrics/filter.json").read_text())
    assert kept.height == fm["kept"] > 0 and rejected.height == fm["rejected"]
    assert kept.height + rejected.height == gen.height
    assert sum(fm["dropped_by_reason"].values()) == rejected.height

    meta = json.loads((repo / "data/tokens/meta.json").read_text())
    index = np.load(repo / "data/tokens/train_index.npy")
    tokens = np.fromfile(repo / "data/tokens/train_tokens.bin", dtype=meta["dtype"])
    assert len(tokens) == index[:, 1].sum() > 0
    im = json.loads((repo / "metrics/ingest.json").read_text())
    convs = pl.read_parquet(repo / "data/conversations/conversations-00000.parquet")
    assert im["sources"]["generated"]["read"] == kept.height and convs.height == im["conversations"] > 0
    tm = json.loads((repo / "metrics/tokenize.json").read_text())
    assert tm["conversations_in"] == convs.height
    assert tm["train"]["examples"] + tm["val"]["examples"] == tm["examples"] >= convs.height - tm["prompt_too_long"]

    assert (repo / "models/student/model.safetensors").exists() and (repo / "models/student/tokenizer.json").exists()
    train_m = json.loads((repo / "metrics/train/metrics.json").read_text())
    assert train_m["step"] == 3 and np.isfinite(train_m["loss"])

    em = json.loads((repo / "metrics/eval.json").read_text())
    assert np.isfinite(em["val_loss"]) and em["val_perplexity"] > 1 and "base_val_loss" in em
    judged = pl.read_parquet(repo / "data/eval/judgments-00000.parquet")
    js = em["judge"]["stillhouse"]
    assert judged.height == js["n"] == 3 and 0 <= js["win_rate"] <= 100 and 0 <= em["stop_rate"] <= 1
    assert set(judged["reference_source"]) == {"teacher"} and judged["preference"].is_in([1.0, 1.5, 2.0]).all()
    assert em["calls"]["model_calls"] > 0


def test_second_repro_runs_nothing(e2e_copy):
    """A full copy of the build (its own cache, new inodes): DVC rehashes and finds nothing to do."""
    out = sh(e2e_copy, "dvc", "repro")
    assert ran(out) == []
    assert "Data and pipelines are up to date" in out.stdout + out.stderr


def test_report_renders_in_a_browser(repo, tmp_path):
    """The first run's data report in headless Chromium: every figure loads and draws something at a
    legible scale, the page makes no request outside itself and logs no error."""
    from PIL import Image

    from tests.support.browser import chromium, inspect_page

    if chromium() is None:
        pytest.skip("chromium is not installed (`make test` installs Debian's package)")
    got = inspect_page(repo / "data/report/index.html")
    assert got["errors"] == []
    assert all(u.startswith(("file:", "data:")) for u in got["requests"]), got["requests"]
    figures = {f["id"]: f for f in got["figures"]}
    judge = json.loads((repo / "metrics/eval.json").read_text()).get("judge")
    want = {"verb_noun", "rouge_seeds", "rouge_threshold", "lengths", "funnel", "ingest", "spend", "training"}
    assert set(figures) == {f"fig-{n}" for n in want | ({"judge"} if judge else set())}
    (tmp_path / "report.png").write_bytes(got["png"])  # to look at
    shot = Image.open(io.BytesIO(got["png"])).convert("L")
    for name, f in figures.items():
        assert f["img"] and f["complete"] and min(f["natural"]) > 100, (name, f)
        x, y, w, h = f["rect"]
        assert w / f["natural"][0] > 0.75, f"{name}: drawn at {w / f['natural'][0]:.0%} of its size"
        pixels = np.asarray(shot.crop((int(x), int(y), int(x + w), int(y + h))))
        assert (pixels < 200).mean() > 0.01 and len(np.unique(pixels)) > 16, f"{name}: blank in the screenshot"
    fm = json.loads((repo / "metrics/filter.json").read_text())
    rows = sum(1 + min(20, n) for n in (fm["kept"], fm["rejected"]) if n)  # a header and up to 20 examples each
    assert (repo / "data/report/index.html").read_text().count("<tr>") == rows


def test_evaluate_param_reruns_only_evaluate(e2e_copy):
    """One judge order instead of both: only evaluate reruns, and every answer and verdict it
    needs is already in its cache (same checkpoint, decoding and prompts): no model call."""
    repo = e2e_copy
    set_params(repo, evaluate={"judge_order": "random"})
    assert [s for s in ran(sh(repo, "dvc", "repro")) if s != "report"] == ["evaluate"]  # report follows eval.json
    diff = sh(repo, "dvc", "params", "diff").stdout
    assert "evaluate.judge_order" in diff
    em = json.loads((repo / "metrics/eval.json").read_text())
    assert em["calls"]["model_calls"] == 0 and em["calls"]["cache_hits"] == em["calls"]["requests"] > 0
    assert em["judge"]["stillhouse"]["position_flip_rate"] is None


def test_filter_param_reruns_downstream_with_no_teacher_calls(e2e_copy):
    repo = e2e_copy
    cache = repo / "data/teacher_cache"
    before_files = sorted(p.name for p in cache.iterdir())
    before_metrics = (repo / "metrics/generate.json").read_text()
    set_params(repo, filter={"rouge_threshold": 0.5})
    out = sh(repo, "dvc", "repro")
    assert ran(out)[0] == "filter" and "generate" not in ran(out)
    assert sorted(p.name for p in cache.iterdir()) == before_files
    assert (repo / "metrics/generate.json").read_text() == before_metrics
    # rerunning generate itself (a changed prompt header comment would do too) hits the cache only
    sh(repo, "dvc", "repro", "-f", "-s", "generate")
    assert json.loads((repo / "metrics/generate.json").read_text())["teacher_calls"] == 0
    assert sorted(p.name for p in cache.iterdir()) == before_files


def test_bad_seeds_stop_the_pipeline(e2e_copy):
    repo = e2e_copy
    seeds = repo / "seeds/seed_tasks.jsonl"
    good = seeds.read_text()
    lines = good.count("\n")
    bad = '{"id": "x", "name": "x", "instruction": "", "instances": [], "is_classification": false}\n'
    seeds.write_text(good + bad)
    try:
        out = sh(repo, "dvc", "repro", check=False)
        assert out.returncode != 0
        text = out.stdout + out.stderr
        assert f"seeds/seed_tasks.jsonl:{lines + 1}: instruction: empty" in text
        assert ran(out) == ["seeds"]
    finally:
        seeds.write_text(good)
