"""Helpers of the end-to-end tests: run commands in a project, read which stages ran, build the tiny
pipeline, and copy a built project so a test can change it without touching anyone else's.

The tiny pipeline is built once per test session (`e2e_build` in conftest.py) and shared by
tests/e2e/test_e2e.py and tests/e2e/test_e2e_remote.py; tests that change it work on `copy_project`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.support.tiny import ROOT, make_tiny_model


def sh(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in its own process group. If anything interrupts the wait (pytest-timeout,
    Ctrl-C), the whole group is killed: `dvc repro`'s stage processes too, not only dvc."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    with subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            stdout, stderr = p.communicate()
        except BaseException:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
            raise
    r = subprocess.CompletedProcess(args, p.returncode, stdout, stderr)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def ran(out: subprocess.CompletedProcess) -> list[str]:
    text = out.stdout + out.stderr
    return [line.split("'")[1] for line in text.splitlines() if line.startswith("Running stage")]


def set_params(repo: Path, **changes: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_e2e_repo(repo: Path) -> Path:
    """The project at `repo` as a fresh git + DVC repository with the project's `.dvc/config` (default
    remote, hardlinks to the cache) and the tiny config, committed, its teacher built and
    `tiny_student` beside it."""
    repo.mkdir(parents=True)
    for name in ["dvc.yaml", "params.yaml", ".gitignore"]:
        shutil.copy(ROOT / name, repo / name)
    for name in ["stages", "seeds", "configs"]:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "ci@example.com")
    sh(repo, "git", "config", "user.name", "ci")
    sh(repo, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    set_params(
        repo,
        generate={"num_requests": 8, "batch_size": 8},
        student={"model": "tiny_student"},
        # prune runs in every full repro: on the tiny student, not the 135M teacher, to stay quick
        prune={"teacher": "tiny_student", "drop_layers": 1, "calibration_examples": 4},
        train={"max_steps": 4, "batch_size": 2},
        evaluate={"max_new_tokens": 8, "ifeval": {"max_new_tokens": 8},
                  "sets": {"stillhouse": {"path": "seeds/eval/eval_prompts.jsonl", "limit": 3}}},
    )
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "init")
    # the student shares the teacher's tokenizer, so build it once the teacher exists
    sh(repo, "dvc", "repro", "teacher_model")
    from transformers import AutoTokenizer

    make_tiny_model(repo / "tiny_student", AutoTokenizer.from_pretrained(repo / "models" / "teacher"))
    return repo


@dataclass(frozen=True)
class E2EBuild:
    """The tiny project after its first full `dvc repro`, committed. Read it; change only a copy."""

    repo: Path
    first_repro: subprocess.CompletedProcess  # the output of that `dvc repro`


def build_e2e(repo: Path) -> E2EBuild:
    make_e2e_repo(repo)
    out = sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny run")
    return E2EBuild(repo, out)


def copy_project(src: Path, dst: Path) -> Path:
    """A full copy of a built project (git, DVC cache, workspace), hardlinks inside it kept as
    hardlinks (a workspace file and its cache object stay one file, as DVC left them), nothing
    shared with `src`: the copy can be changed, rebuilt or pushed without touching `src`."""
    seen: dict[tuple[int, int], str] = {}

    def copy(s: str, d: str) -> None:
        st = os.stat(s, follow_symlinks=False)
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in seen:
            os.link(seen[key], d)
        else:
            shutil.copy2(s, d)
            seen[key] = d

    shutil.copytree(src, dst, symlinks=True, copy_function=copy)
    return dst
