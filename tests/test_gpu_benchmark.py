"""benchmarks/gpu_train.py: the MFU arithmetic, the GPU table, and a CPU smoke run of the script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.gpu_train import flops_per_token, peak_tflops
from tests.conftest import ROOT


def test_peak_table_matches_device_names():
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("Some Future GPU") is None


def test_flops_per_token():
    # 7B full fine-tuning at 2048: 6N dominates, attention adds 12 * 32 * 4096 * 2048
    assert flops_per_token(7_000_000_000, 32, 4096, 2048, lora=False) == 6 * 7e9 + 12 * 32 * 4096 * 2048
    assert flops_per_token(10, 1, 1, 1, lora=True) == 4 * 10 + 12


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
