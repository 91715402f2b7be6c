"""Fixtures only (the helpers they use live in tests/support/): a tiny tokenizer and a tiny random Llama
built on the fly, a per-test teacher store, the e2e build, and the `slow` / `e2e` markers' handling."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.tiny import make_tiny_model, make_tokenizer


@pytest.fixture(autouse=True)
def teacher_store(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own teacher store (stages/lib/llm/store.py), never the user's ~/.cache:
    the variable reaches the stages that tests run in subprocesses and through DVC."""
    path = tmp_path_factory.mktemp("teacher-store")
    monkeypatch.setenv("STILLHOUSE_TEACHER_STORE", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test inside tmp_path (stages read params.yaml and data/ relative to cwd)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- end to end (tests/support/e2e.py)

# pytest-timeout (pyproject.toml `timeout`) for the fast tests; an e2e test gets this instead,
# fixture setup included: the first one builds the shared tiny pipeline (about 4 min on 2 idle
# cores) and the interrupted S3 push may wait 5 min by design. On a machine shared with other
# heavy jobs, raise it with STILLHOUSE_E2E_TIMEOUT_S (the build took over 20 min at load 12).
E2E_TIMEOUT_S = int(os.environ.get("STILLHOUSE_E2E_TIMEOUT_S") or 1200)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run tests marked `slow` (opt-in checks of paths stillhouse never picks by default)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("e2e") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_S))
    # `slow` tests are deselected (counted in pytest's summary line) unless --slow: `make test PYTEST_ARGS=--slow`
    if not config.getoption("--slow"):
        slow = [i for i in items if i.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [i for i in items if not i.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def e2e_build(tmp_path_factory):
    """The tiny project after one full `dvc repro` on the embedded teacher and a tiny random student,
    committed: built once per session, shared by tests/e2e/test_e2e.py and tests/e2e/test_e2e_remote.py.
    Read it only; a test that changes the project takes `e2e_copy`."""
    from tests.support.e2e import build_e2e

    # its own teacher store: the per-test `teacher_store` is not set up yet for a session fixture
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STILLHOUSE_TEACHER_STORE", str(tmp_path_factory.mktemp("e2e-teacher-store")))
        return build_e2e(tmp_path_factory.mktemp("e2e") / "project")


@pytest.fixture
def e2e_copy(e2e_build, tmp_path) -> Path:
    """This test's own full copy of the shared build (git, DVC cache, workspace)."""
    from tests.support.e2e import copy_project

    return copy_project(e2e_build.repo, tmp_path / "project")
