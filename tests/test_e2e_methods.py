"""End to end, each generate method through `dvc repro` against a fake OpenAI-compatible teacher.

seeds -> generate -> filter run as DVC stages (`-s`: the embedded teacher is not needed), the
fake answers each kind of prompt (bootstrap list, Yes/No, instances, chat answers, judge). Checks
the output schema that filter consumes, per-step metrics, and that a forced rerun is served
from the cache with zero teacher calls.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml

from stages.lib.generation.self_instruct import BOOTSTRAP_HEADER, CLASSIFY_HEADER, OUTPUT_FIRST_HEADER
from tests.conftest import ROOT
from tests.fake_openai import FakeOpenAI, _last_user_text
from tests.e2e import ran, sh

pytestmark = pytest.mark.e2e

WORDS = ("river mountain poem recipe budget letter story garden planet museum violin bicycle harbor lantern "
         "orchard meadow castle engine compass festival journal puzzle quilt rocket saddle teapot tunnel "
         "volcano wagon yacht zebra anchor bakery canyon desert feather glacier island jungle kettle").split()
VERBS = "Describe Summarize Explain Compare Invent Plan Rewrite Critique Outline Praise".split()


def reply(body: dict) -> str:
    text = _last_user_text(body)
    rng = random.Random(hashlib.sha256(text.encode()).hexdigest())
    if text.startswith(BOOTSTRAP_HEADER):
        n = int(text.rsplit("\n", 1)[-1].rstrip("."))
        items = [f"{rng.choice(VERBS)} the {' '.join(rng.sample(WORDS, 5))} briefly." for _ in range(3)]
        return " " + "".join(f"{t}\n{n + k + 1}. " if k < 2 else t for k, t in enumerate(items))
    if text.startswith(CLASSIFY_HEADER):
        return rng.choice([" Yes", " No", " Unsure"])
    if text.startswith(OUTPUT_FIRST_HEADER):
        return "Class label: yes\nInput: a sunny day\nClass label: no\nInput: a rainy night\n"
    if text.startswith("Come up with examples"):
        return f"Example 1\nInput: {rng.choice(WORDS)}\nOutput: about {rng.choice(WORDS)}\nExample 2\nOutput: plain"
    if text.startswith("Which response"):
        return "2"
    return f"A helpful answer about {rng.choice(WORDS)} and {rng.choice(WORDS)}."


@pytest.fixture(scope="module")
def teacher():
    with FakeOpenAI(reply=reply) as srv:
        yield srv


def make_repo(root: Path, teacher: FakeOpenAI, generate: dict) -> Path:
    repo = root / "project"
    repo.mkdir()
    for name in ["dvc.yaml", "params.yaml", ".gitignore"]:
        shutil.copy(ROOT / name, repo / name)
    for name in ["stages", "seeds", "configs"]:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "models/teacher").mkdir(parents=True)
    (repo / "models/teacher/unused").write_text("the fake teacher is an API")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for k, v in {"backend": "openai", "base_url": teacher.base_url, "model": "fake", **generate}.items():
        params["generate"][k] = {**params["generate"][k], **v} if isinstance(v, dict) else v
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in [("git", "init", "-q"), ("git", "config", "user.email", "ci@example.com"),
                 ("git", "config", "user.name", "ci"), ("dvc", "init", "-q")]:
        sh(repo, *args)
    return repo


def build(repo: Path) -> tuple[pl.DataFrame, dict, dict]:
    for stage in ["seeds", "generate", "filter"]:
        assert ran(sh(repo, "dvc", "repro", "-s", stage)) == [stage]
    tasks = pl.read_parquet(repo / "data/generated/tasks-00000.parquet")
    return tasks, json.loads((repo / "metrics/generate.json").read_text()), \
        json.loads((repo / "metrics/filter.json").read_text())


def rerun_is_cached(repo: Path, teacher: FakeOpenAI) -> None:
    before = len(teacher.requests)
    tasks = (repo / "data/generated/tasks-00000.parquet").read_bytes()
    sh(repo, "dvc", "repro", "-s", "-f", "generate")
    m = json.loads((repo / "metrics/generate.json").read_text())
    assert len(teacher.requests) == before and m["teacher_calls"] == 0 and m["cache_hits"] == m["requests"]
    assert (repo / "data/generated/tasks-00000.parquet").read_bytes() == tasks  # deterministic


def test_self_instruct_method(tmp_path, teacher):
    repo = make_repo(tmp_path, teacher, {"method": "self_instruct", "num_requests": 4,
                                         "self_instruct": {"requests_per_round": 2}})
    tasks, gm, fm = build(repo)
    steps = gm["steps"]
    assert steps["bootstrap"]["requests"] == 4 and steps["bootstrap"]["instructions_kept"] > 4
    assert sum(steps["classify"].values()) == steps["bootstrap"]["instructions_kept"]
    assert steps["instances"]["output_first"] == steps["classify"].get("yes", 0) > 0
    assert set(tasks["method"]) == {"self_instruct"} and tasks.height == steps["instances"]["instances_kept"]
    assert set(tasks.filter(pl.col("is_classification"))["output"]) == {"yes", "no"}
    assert tasks["is_classification"].null_count() > 0  # unknowns kept as unknown
    assert gm["teacher_calls"] == 4 + 2 * steps["bootstrap"]["instructions_kept"]
    assert fm["kept"] > 0 and fm["parsed"] == tasks.height
    rerun_is_cached(repo, teacher)


def test_responses_from_bootstrap(tmp_path, teacher):
    repo = make_repo(tmp_path, teacher, {"method": "responses", "num_requests": 2})
    tasks, gm, fm = build(repo)
    assert gm["steps"]["responses"]["prompts"] == gm["steps"]["bootstrap"]["instructions_kept"] == tasks.height > 0
    assert all(s.startswith("self_instruct:si-") for s in tasks["source"])
    assert all(o.startswith("A helpful answer") for o in tasks["output"])
    assert any(r["path"].endswith("/chat/completions") for r in teacher.requests)  # answers asked as chat
    assert fm["kept"] > 0
    rerun_is_cached(repo, teacher)


def test_responses_from_a_prompt_file_with_a_judge(tmp_path, teacher):
    repo = make_repo(tmp_path, teacher, {"method": "responses", "responses": {
        "prompts": "seeds/prompts/prompts.jsonl", "n": 2, "select": "judge"}})
    lines = [{"instruction": f"Plan a trip to the {w} with friends.", "input": ""} for w in WORDS[:6]]
    (repo / "seeds/prompts/prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    tasks, gm, fm = build(repo)
    r = gm["steps"]["responses"]
    assert r["prompts"] == 6 and r["requests"] == 12 and r["judged"] == 6 and tasks.height == 6
    assert list(tasks["item_index"]) == [1] * 6  # the judge said "2"
    assert list(tasks["source"]) == [f"seeds/prompts/prompts.jsonl:{i}" for i in range(1, 7)]
    assert gm["teacher_calls"] == 12 + 6 and fm["kept"] > 0
    rerun_is_cached(repo, teacher)
    # the prompt file is a dependency: editing it reruns generate
    (repo / "seeds/prompts/prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:3]))
    assert ran(sh(repo, "dvc", "repro", "-s", "generate")) == ["generate"]
