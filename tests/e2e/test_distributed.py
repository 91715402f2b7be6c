"""Training under `accelerate launch` with two CPU processes (gloo), using the repository's configs.

Two processes with micro-batch 2 and no accumulation must follow the same loss sequence as one
process with micro-batch 2 and accumulation 2 (the same micro-batches, the same loss
normalisation); FSDP must gather the shards and save a loadable, LoRA-merged student.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stages.lib import paths
from tests.support.builders import ROWS8, free_port, make_data
from tests.support.tiny import ROOT

pytestmark = pytest.mark.e2e

CONFIGS = ROOT / "configs" / "accelerate"


def launch(tmp: Path, config: str, num_processes: int, **train) -> dict:
    """Run `accelerate launch ... -m stages.train` in `tmp` (params.yaml + data/tokens there)."""
    params = {"student": {"model": train.pop("base_model")},
              "train": {"checkpoint_every": 0, "warmup_ratio": 0.0, **train}}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    # no GPU here: the processes join a gloo group on the CPU (`--cpu` would run a single process)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", str(num_processes), "--main_process_port", str(free_port()),
           "-m", "stages.train"]
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    rows = (tmp / paths.TRAIN_LOG / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    return {"losses": [float(x.split("\t")[1]) for x in rows], "out": tmp / paths.STUDENT}


@pytest.fixture
def setup(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    def make(name: str) -> Path:
        d = tmp_path / name
        make_data(d / "data" / "tokens", AutoTokenizer.from_pretrained(tiny_model), ROWS8)
        return d

    return make


def test_configs_parse_and_say_what_they_are():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: load_config_from_file(str(CONFIGS / f"{name}.yaml"))
             for name in ("single", "ddp", "fsdp", "multinode")}
    assert kinds["single"].distributed_type == "NO" and kinds["single"].num_processes == 1
    assert kinds["ddp"].distributed_type == "MULTI_GPU"
    assert kinds["fsdp"].distributed_type == "FSDP" and kinds["fsdp"].fsdp_config["fsdp_version"] == 2
    assert kinds["multinode"].num_machines > 1 and kinds["multinode"].num_processes > kinds["multinode"].num_machines


def test_two_processes_follow_the_single_process_run(setup, tiny_model):
    kw = {"base_model": str(tiny_model), "method": "full", "max_steps": 4, "batch_size": 2, "learning_rate": 3e-3}
    one = launch(setup("one"), "single.yaml", 1, grad_accum=2, **kw)
    two = launch(setup("two"), "ddp.yaml", 2, grad_accum=1, **kw)
    assert len(one["losses"]) == len(two["losses"]) == 4
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    from safetensors.torch import load_file

    a, b = load_file(one["out"] / "model.safetensors"), load_file(two["out"] / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_fsdp_gathers_and_saves_a_merged_lora_student(setup, tiny_model):
    from transformers import AutoModelForCausalLM

    kw = {"base_model": str(tiny_model), "method": "lora", "lora_r": 4, "lora_dropout": 0.0, "max_steps": 3,
          "batch_size": 2, "learning_rate": 1e-2}
    one = launch(setup("one"), "single.yaml", 1, grad_accum=2, **kw)
    fsdp = launch(setup("fsdp"), "fsdp.yaml", 2, grad_accum=1, **kw)
    assert fsdp["losses"] == pytest.approx(one["losses"], rel=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(fsdp["out"])  # a plain model: the adapter is merged
    ref = AutoModelForCausalLM.from_pretrained(one["out"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    q = "model.layers.0.self_attn.q_proj.weight"
    sd, rd, bd = merged.state_dict(), ref.state_dict(), base.state_dict()
    assert (sd[q] - bd[q]).abs().max() > 0
    for k in rd:
        torch.testing.assert_close(sd[k], rd[k], rtol=1e-3, atol=1e-5)
    assert json.loads((fsdp["out"] / "adapter" / "adapter_config.json").read_text())["r"] == 4
