"""A fake teacher for every generate method (`reply`: a bootstrap list, Yes/No, instances, chat answers,
a judge's verdict, deterministic per prompt), and `make_repo`: a project copy that asks it."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import yaml

from stages.generate import GenerateParams
from stages.lib.generation.self_instruct import BOOTSTRAP_HEADER, CLASSIFY_HEADER, OUTPUT_FIRST_HEADER
from tests.support.e2e import sh
from tests.support.fake_openai import FakeOpenAI, _last_user_text
from tests.support.params import set_keys
from tests.support.tiny import ROOT

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


def make_repo(root: Path, teacher: FakeOpenAI, generate: dict) -> Path:
    repo = root / "project"
    repo.mkdir()
    for name in ["dvc.yaml", "params.yaml", ".gitignore"]:
        shutil.copy(ROOT / name, repo / name)
    for name in ["stages", "seeds", "configs"]:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for stub in ("models/teacher", "models/pruned"):  # dvc.yaml deps of select; a test needing a model makes one
        (repo / stub).mkdir(parents=True)
        (repo / stub / "unused").write_text("the fake teacher is an API")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    set_keys(params["generate"], GenerateParams, **{"backend": "openai", "base_url": teacher.base_url, "model": "fake",
                                                    **generate})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in [("git", "init", "-q"), ("git", "config", "user.email", "ci@example.com"),
                 ("git", "config", "user.name", "ci"), ("dvc", "init", "-q")]:
        sh(repo, *args)
    return repo
