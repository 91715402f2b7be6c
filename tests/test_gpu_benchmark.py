"""benchmarks/gpu_train.py: the MFU arithmetic, the GPU table, and a CPU smoke run of the script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.gpu_train import flops_per_token, peak_tflops
from tests.support.tiny import ROOT


def test_peak_table_matches_device_names():
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("Some Future GPU") is None


def test_flops_per_token():
    # 7B full fine-tuning at 2048: 6N dominates, attention adds 12 * 32 * 4096 * 2048
    assert flops_per_token(7_000_000_000, 32, 4096, 2048, lora=False) == 6 * 7e9 + 12 * 32 * 4096 * 2048
    assert flops_per_token(10, 1, 1, 1, lora=True) == 4 * 10 + 12


def test_plan_errors_on_a_gpu_count_the_whole_device_footprint(monkeypatch):
    """On a GPU the plan (with its 1 GiB overhead) is held to torch's peak reserved memory plus what
    lives outside torch's allocator, and without the overhead to the peak of live tensors."""
    import torch

    from benchmarks.gpu_train import plan_errors

    mib = 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (70_000 * mib, 80_000 * mib))  # 10,000 MiB used
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 9_500 * mib)  # 500 MiB outside torch
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 11_500 * mib)
    got = plan_errors({"planned_memory_mb": 13_200.0, "peak_memory_mb": 11_000.0}, cuda=True)
    assert got == {"peak_reserved_mb": 11_500.0, "outside_torch_mb": 500.0, "plan_error": 0.1,
                   "plan_error_live": round(12_176 / 11_000 - 1, 3)}
    assert plan_errors({"planned_memory_mb": 1100.0, "peak_memory_mb": 1000.0}, cuda=False) == {"plan_error": 0.1}


@pytest.mark.e2e
def test_cpu_smoke_run_reports_throughput(tmp_path, tiny_model):
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_train", "--model", str(tiny_model), "--synthetic", "24",
                        "--seq-len", "128", "--steps", "3", "--warmup-steps", "1", "--allow-cpu", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["device"] == "cpu" and rep["mfu"] is None and rep["steps"] == 3 and rep["seq_len"] == 128
    assert rep["tokens_per_s"] > 0 and 0 < rep["padding_efficiency"] <= 1 and rep["params"] > 0
    none = subprocess.run([sys.executable, "-m", "benchmarks.gpu_train", "--model", str(tiny_model)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert none.returncode == 0 and "no CUDA device" in none.stdout


def test_gpu_check_without_a_gpu_fails_and_leaves_nothing(tmp_path):
    """`benchmarks/gpu_check.sh` on a machine with no CUDA device checked nothing: exit 1, one line on stderr, and
    no empty results folder that would look like a run."""
    import os
    import shutil

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the script would run")
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    env = {**os.environ, "OUT_DIR": str(tmp_path / "out"), "PATH": f"{os.path.dirname(sys.executable)}:"
           f"{os.environ.get('PATH', '')}"}
    env.pop("ALLOW_CPU", None)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert (r.returncode, r.stdout, r.stderr.splitlines()) == (
        1, "", ["gpu_check: no CUDA device here, nothing checked (ALLOW_CPU=1 for a CPU smoke run)"]), r.stderr
    assert not (tmp_path / "out").exists()
