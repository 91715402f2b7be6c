"""End to end through DVC experiments: nothing bought is lost when DVC deletes a failed run's workspace.

`dvc exp run --temp` and queued experiments run in a copy of the workspace under .dvc/tmp/exps that
DVC deletes when the run fails, persist outputs (data/teacher_cache) included. The teacher store
outside the repository (here the per-test STILLHOUSE_TEACHER_STORE from conftest) keeps every
answer and Batch job id, so the next experiment pays only for what was never answered. The
project is cut to seeds -> generate with a loopback API teacher (FakeOpenAI), as in
test_e2e_methods.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from stages.generate import GenerateParams
from tests.support.e2e import sh
from tests.support.fake_openai import FakeOpenAI, _last_user_text
from tests.support.params import set_keys
from tests.support.tiny import ROOT

pytestmark = pytest.mark.e2e

N = 10  # generate requests per experiment


def make_repo(root: Path, teacher: FakeOpenAI, **generate) -> Path:
    repo = root / "project"
    repo.mkdir()
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    for name in ["stages", "seeds"]:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "models/teacher").mkdir(parents=True)
    (repo / "models/teacher/unused").write_text("the fake teacher is an API")
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    (repo / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {k: pipeline["stages"][k] for k in ("seeds", "generate")}}, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    set_keys(params["generate"], GenerateParams, **{"backend": "openai", "base_url": teacher.base_url, "model": "fake",
                                                    "num_requests": N, "concurrency": 1, "max_attempts": 1, **generate})
    # generate also reads filter's rule params (self-instruct's bootstrap; declared in dvc.yaml)
    (repo / "params.yaml").write_text(yaml.safe_dump({k: params[k] for k in ("seeds", "generate", "filter")},
                                                     sort_keys=False))
    for args in [("git", "init", "-q"), ("git", "config", "user.email", "ci@example.com"),
                 ("git", "config", "user.name", "ci"), ("dvc", "init", "-q"), ("git", "add", "-A"),
                 ("git", "commit", "-qm", "project")]:
        sh(repo, *args)
    return repo


def answered(teacher: FakeOpenAI, since: int = 0) -> list[str]:
    """Prompts of the completion requests the fake received after request number `since`."""
    return [_last_user_text(r["body"]) for r in teacher.requests[since:] if r["path"].endswith("/completions")]


def fails_after(k: int):
    """Answer the first k completion requests, then fail every one (a 500, never retried: max_attempts 1)."""
    return lambda n, body: "500" if n >= k else None


def exp_metrics(repo: Path) -> dict:
    """generate's metrics of the newest successful experiment."""
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    exps = [e for commit in shown for e in (commit.get("experiments") or [])]
    assert exps, "no successful experiment"
    revs = exps[0]["revs"][0]
    return revs["data"]["metrics"]["metrics/generate.json"]["data"]


def test_failed_temp_experiment_loses_no_answer(tmp_path):
    with FakeOpenAI(faults=fails_after(6)) as teacher:
        repo = make_repo(tmp_path, teacher)
        out = sh(repo, "dvc", "exp", "run", "--temp", "generate", check=False)
        assert out.returncode != 0 and "max_failure_rate" in out.stdout + out.stderr
        bought = answered(teacher)[:6]
        assert len(answered(teacher)) == N and not list((repo / ".dvc/tmp/exps").glob("**/teacher_cache"))
        teacher.faults = None
        before = len(teacher.requests)
        sh(repo, "dvc", "exp", "run", "--temp", "generate")
        again = answered(teacher, before)
        assert len(again) == N - 6 and not set(again) & set(bought)
        m = exp_metrics(repo)
        assert m["cache_hits"] == 6 and m["teacher_calls"] == N - 6 and m["failed"] == 0


def wait_for_queue(repo: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = sh(repo, "dvc", "queue", "status").stdout
        if not any(w in status for w in ("Queued", "Running")):
            return
        time.sleep(5)  # each poll is a `dvc` process: polling less leaves the CPU to the queued run
    raise AssertionError(f"queue still busy:\n{status}")


def test_failed_queued_experiment_loses_no_answer(tmp_path):
    with FakeOpenAI(faults=fails_after(6)) as teacher:
        repo = make_repo(tmp_path, teacher)
        try:
            sh(repo, "dvc", "exp", "run", "--queue", "generate")
            sh(repo, "dvc", "queue", "start")
            wait_for_queue(repo)
            assert "Failed" in sh(repo, "dvc", "queue", "status").stdout
            bought = answered(teacher)[:6]
            assert len(answered(teacher)) == N
            teacher.faults = None
            before = len(teacher.requests)
            sh(repo, "dvc", "exp", "run", "--queue", "generate")
            sh(repo, "dvc", "queue", "start")
            wait_for_queue(repo)
            assert "Success" in sh(repo, "dvc", "queue", "status").stdout
        finally:
            sh(repo, "dvc", "queue", "stop", "--kill", check=False)
        again = answered(teacher, before)
        assert len(again) == N - 6 and not set(again) & set(bought)


def test_batch_job_of_a_failed_temp_experiment_is_collected_not_resubmitted(tmp_path):
    with FakeOpenAI() as teacher:
        repo = make_repo(tmp_path, teacher, batch_api=True)
        out = sh(repo, "dvc", "exp", "run", "--temp", "generate", check=False)
        assert out.returncode != 0 and "Batch API job" in out.stdout + out.stderr
        sh(repo, "dvc", "exp", "run", "--temp", "generate")
        posts = [r for r in teacher.requests if r["path"] == "/v1/batches" and r["method"] == "POST"]
        assert len(posts) == 1 and answered(teacher) == []  # one job, nothing through the synchronous endpoint
        m = exp_metrics(repo)
        assert m["batch"] == {"collected": N, "submitted": 0, "running_jobs": 0} and m["failed"] == 0
