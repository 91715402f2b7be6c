"""Every recipe in configs/recipes: its keys exist, its values pass the stages' checks, its memory plan
fits the GPUs it is written for, and it trains for two steps on a tiny model of the same architecture
(Llama, scaled down) under its own accelerate config (FSDP: two gloo processes on the CPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from transformers import AutoTokenizer

from stages.lib import paths
from stages.lib.errors import StageError
from stages.lib.params import params_from_dict
from stages.tools.recipe import RECIPES, apply, load_recipe, write_recipe
from tests.support.builders import LLAMA_8B, ROWS8, make_data
from tests.support.tiny import ROOT

NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml"))
TARGET_GPU_GB = {"alpaca-7b": 80, "lora-24gb": 24}


def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def processes(config: str) -> int:
    return yaml.safe_load((ROOT / config).read_text()).get("num_processes", 1)


def test_the_recipes_are_there():
    assert {"alpaca-7b", "lora-24gb"} <= set(NAMES) and set(NAMES) <= set(TARGET_GPU_GB)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_numbers_are_numbers_in_the_raw_yaml(name):
    """PyYAML (YAML 1.1) reads `2e-5` as the string '2e-5'; the stage would convert it, so check the file
    itself: no value of a recipe is a string that reads as a number."""
    raw = yaml.safe_load((ROOT / "configs/recipes" / f"{name}.yaml").read_text())
    assert isinstance(raw["train"]["learning_rate"], float)  # written 2.0e-5

    def leaves(x, where):
        if isinstance(x, dict):
            for k, v in x.items():
                yield from leaves(v, f"{where}.{k}")
        else:
            yield where, x
    numeric = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
    assert not [w for w, v in leaves(raw, name) if isinstance(v, str) and numeric.fullmatch(v)]


@pytest.mark.parametrize("name", NAMES)
def test_recipe_values_pass_the_stage_checks_and_the_plan_fits(name):
    from stages.evaluate import EvaluateParams
    from stages.lib.student import StudentParams
    from stages.lib.training.memory import CUDA_OVERHEAD, check, plan_for
    from stages.tokenize import TokenizeParams
    from stages.train import TrainParams

    p = apply(params(), load_recipe(name))
    t = params_from_dict(TrainParams, p["train"])
    params_from_dict(TokenizeParams, p["tokenize"])
    params_from_dict(EvaluateParams, p["evaluate"])
    params_from_dict(StudentParams, p["student"])
    n = processes(t.accelerate_config)
    assert t.batch_size * t.grad_accum * n == 128  # Alpaca's global batch
    assert p["tokenize"]["val_fraction"] <= 0.05
    fsdp = "fsdp" in t.accelerate_config
    plan = plan_for(t, LLAMA_8B, t.dtype, p["tokenize"]["max_seq_len"], n, fsdp, overhead=CUDA_OVERHEAD)
    assert check(plan, TARGET_GPU_GB[name] * 1e9, t.method, fsdp, n, t.batch_size, t.gradient_checkpointing,
                 t.loss_chunk_tokens) is None, plan.table()


def test_a_recipe_key_missing_from_params_is_an_error(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(StageError, match="train.learning_rat"):
        write_recipe(f, {"train": {"learning_rat": 1.0}})
    changes = write_recipe(f, load_recipe("alpaca-7b"))
    assert ("train.learning_rate", 0.0002, 2e-5) in changes
    text = f.read_text()
    assert "learning_rate: 2.0e-05" in text and "# stillhouse parameters" in text  # YAML 1.1 float, comments kept
    assert yaml.safe_load(text)["train"]["learning_rate"] == 2e-5


@pytest.mark.e2e
@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_trains_two_steps_on_a_tiny_model(tmp_path, tiny_model, name):
    p = apply(params(), load_recipe(name))
    p["student"]["model"] = str(tiny_model)
    # two steps; accumulation cut to 2 micro-batches (the global batch is checked above): CPU time
    p["train"].update(max_steps=2, grad_accum=min(2, p["train"]["grad_accum"]))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    make_data(tmp_path / paths.TOKENS, AutoTokenizer.from_pretrained(tiny_model), ROWS8 * 8,
              max_seq_len=p["tokenize"]["max_seq_len"])
    n = min(2, processes(p["train"]["accelerate_config"]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    from tests.support.builders import free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / p["train"]["accelerate_config"]), "--num_processes", str(n),
           "--main_process_port", str(free_port()), "-m", "stages.train"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "memory plan per process" in r.stderr
    rows = (tmp_path / paths.TRAIN_LOG / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    assert len(rows) == 2
    saved = json.loads((tmp_path / paths.STUDENT / "stillhouse_train.json").read_text())
    assert saved["dtype"] == p["train"]["dtype"] and saved["params"]["method"] == p["train"]["method"]
    assert (tmp_path / paths.STUDENT / "model.safetensors").exists()


def test_writing_a_recipe_rewrites_only_the_values_it_changes(tmp_path):
    """Each changed value is rewritten where it stands (its line keeps its comment, in its column); every other
    line of params.yaml is left byte for byte, and the file reads as params.yaml with the recipe applied."""
    import difflib

    f = tmp_path / "params.yaml"
    before = (ROOT / "params.yaml").read_text()
    f.write_text(before)
    for name in NAMES:
        f.write_text(before)
        changes = write_recipe(f, load_recipe(name))
        after = f.read_text()
        old, new = before.splitlines(), after.splitlines()
        changed = [a for a in difflib.ndiff(old, new) if a.startswith("- ")]
        assert len(old) == len(new) and 0 < len(changed) <= len(changes), "\n".join(changed)
        for was, now in ((a, b) for a, b in zip(old, new) if a != b and "#" in a):
            at = now.index("#")  # the comment is kept, in its column unless the new value is longer
            assert now[at:] == was[was.index("#"):], (was, now)
            assert at == was.index("#") or now[at - 2] != " ", (was, now)  # moved only by a longer value
        assert yaml.safe_load(after) == apply(yaml.safe_load(before), load_recipe(name))


def test_list_shows_each_recipe_s_first_sentence_whole(capsys):
    from stages.tools.recipe import main

    main(["--list"])
    out = capsys.readouterr().out
    entries = re.split(r"\n(?=\S)", out.strip())
    assert [e.split(":")[0] for e in entries] == NAMES
    for e in entries:
        text = " ".join(e.split())
        assert text.endswith(".") and len(text) > 80, text
        assert max(len(x) for x in e.splitlines()) <= 100


@pytest.fixture
def machine(monkeypatch):
    """This machine as the preflight sees it: no key, no GPU, no Hugging Face token (set per test)."""
    from stages.tools import recipe

    state = {"gpus": 0, "token": False, "ran": []}
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(recipe, "gpu_count", lambda: state["gpus"])
    monkeypatch.setattr(recipe, "hf_token", lambda: state["token"])
    monkeypatch.setattr(recipe, "in_hf_cache", lambda model: False)
    monkeypatch.setattr(recipe.subprocess, "call", lambda args: state["ran"].append(args) or 0)
    return state


def test_run_says_what_the_recipe_needs_and_does_not_start_without_it(tmp_path, machine, monkeypatch, capsys):
    from stages.tools.recipe import main

    f = tmp_path / "params.yaml"
    f.write_text((ROOT / "params.yaml").read_text())
    run = ["alpaca-7b", "--params", str(f), "--run", "--", "-S", "student.model=meta-llama/Llama-3.1-8B"]
    with pytest.raises(StageError, match=r"^recipe alpaca-7b: not run, 3 of its needs not met here .* unchanged"):
        main(run)
    out = capsys.readouterr().out
    assert "MISSING  OPENAI_API_KEY (api.openai.com for generate.teacher, evaluate.teacher, evaluate.judge)" in out
    assert "MISSING  8 CUDA GPUs (configs/accelerate/fsdp.yaml: num_processes 8); this machine has 0" in out
    assert "MISSING  access to the gated meta-llama/Llama-3.1-8B (student.model)" in out
    assert f.read_text() == (ROOT / "params.yaml").read_text() and machine["ran"] == []

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    machine.update(gpus=8, token=True)
    with pytest.raises(SystemExit) as done:
        main(run)
    assert done.value.code == 0
    assert machine["ran"] == [["dvc", "exp", "run", "-S", "student.model=meta-llama/Llama-3.1-8B"]]
    out = capsys.readouterr().out
    assert "MISSING" not in out and out.count("  ok  ") == 3

    # the `-S` after `--` counts: an ungated student needs no token; a local server no key
    f.write_text((ROOT / "params.yaml").read_text())
    monkeypatch.delenv("OPENAI_API_KEY")
    machine.update(gpus=1, token=False)
    main(["lora-24gb", "--params", str(f), "--dry-run", "--", "-S", "student.model=Qwen/Qwen2.5-7B"])
    out = capsys.readouterr().out
    assert "ok       1 CUDA GPU (train.dtype bfloat16, train.method lora); this machine has 1" in out
    assert "gated" not in out and "OPENAI_API_KEY" not in out
