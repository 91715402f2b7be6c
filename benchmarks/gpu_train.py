"""A short training run on the GPU: what a GPU user gets in tokens/s, memory and MFU.

Runs the pipeline's own `stages.train.train` (packing on, bf16 where the GPU has it) for a few
steps on the token arrays of `dvc repro tokenize` (`--data`) or on synthetic examples
(`--synthetic N`: random token ids, lengths 64..seq_len, the second half supervised), then
reports the median throughput over the steps after warm-up and the model FLOPs utilisation:

    MFU = flops_per_token x tokens_per_s / peak_flops
    flops_per_token = 6 N (full) or 4 N (LoRA: no weight gradients for the frozen base)
                      + 12 x layers x hidden x seq_len (attention scores, dense over the packed row)

with N the model's parameter count and the GPU's dense bf16 peak from the table below (or
`--peak-tflops`). Without CUDA it says so and exits, unless `--allow-cpu` (a smoke run: MFU is
then not reported).

    python -m benchmarks.gpu_train --model HuggingFaceTB/SmolLM2-360M-Instruct --synthetic 2000 --steps 30
    accelerate launch --config_file configs/accelerate/ddp.yaml -m benchmarks.gpu_train --synthetic 8000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

PEAK_BF16_TFLOPS = {  # dense, no sparsity, from the vendors' data sheets
    "H200": 989.0, "H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "GH200": 989.0, "B200": 2250.0,
    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
    "RTX 4090": 165.0, "RTX 3090": 71.0, "A6000": 155.0, "V100": 125.0, "T4": 65.0,
}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU from its name (longest matching key), None when unknown."""
    hits = [k for k in PEAK_BF16_TFLOPS if k.lower() in device_name.lower()]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def flops_per_token(n_params: int, layers: int, hidden: int, seq_len: int, lora: bool) -> float:
    return (4 if lora else 6) * n_params + 12 * layers * hidden * seq_len


def synthetic_tokens(folder: Path, tok, n: int, seq_len: int, seed: int = 0) -> None:
    from stages.lib.io import write_json
    from stages.lib.tokens.arrays import tokenizer_id, write_split

    rng = np.random.default_rng(seed)
    vocab = min(len(tok), 2**16 - 1)
    enc = []
    for i in range(n):
        length = int(rng.integers(64, seq_len + 1))
        ids = rng.integers(0, vocab, size=length).tolist()
        mask = [0] * (length // 2) + [1] * (length - length // 2)
        texts = {"id": str(i), "source": "synthetic", "instruction": "", "input": "", "output": "", "prompt": ""}
        enc.append((texts, ids, mask))
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if len(tok) < 2**16 else np.uint32
    write_split(folder, "train", enc, dtype)
    write_split(folder, "val", enc[:1], dtype)
    write_json(folder / "meta.json", {"dtype": np.dtype(dtype).name, "tokenizer_id": tokenizer_id(tok),
                                      "tokenizer": "synthetic", "max_seq_len": seq_len, "template": "alpaca"})


def saved_dtypes(folder: Path) -> dict:
    """The saved student's tensor dtypes against the dtype it was trained in (stillhouse_train.json)."""
    from safetensors import safe_open

    trained = json.loads((folder / "stillhouse_train.json").read_text())["dtype"]
    dtypes = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            dtypes |= {str(st.get_slice(k).get_dtype()) for k in st.keys()}
    config = json.loads((folder / "config.json").read_text()).get("dtype")
    names = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
    return {"trained_dtype": trained, "tensor_dtypes": sorted(dtypes), "config_dtype": config,
            "ok": dtypes == {names[trained]} and config == trained}


def plan_errors(summary: dict, cuda: bool) -> dict:
    """The plan against what was measured. On the CPU: peak RSS. On a GPU the plan's total (with its
    1 GiB overhead for the CUDA context and the allocator's cache) against the device footprint at
    the peak: torch's peak reserved memory plus what is outside torch's allocator (context, cuBLAS
    and NCCL workspaces: used device memory minus torch's reserved, read now); and the plan without
    its overhead against the peak of live tensors (`max_memory_allocated`, train's peak_memory_mb)."""
    planned, live = summary["planned_memory_mb"], summary["peak_memory_mb"]
    if not cuda:
        return {"plan_error": round(planned / live - 1, 3)}
    import torch

    from stages.lib.training.memory import CUDA_OVERHEAD

    free, total = torch.cuda.mem_get_info()
    outside = (total - free - torch.cuda.memory_reserved()) / 2**20
    reserved = torch.cuda.max_memory_reserved() / 2**20
    return {"peak_reserved_mb": round(reserved, 1), "outside_torch_mb": round(outside, 1),
            "plan_error": round(planned / (reserved + outside) - 1, 3),
            "plan_error_live": round((planned - CUDA_OVERHEAD / 2**20) / live - 1, 3)}


def main() -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from stages.train import TrainParams, train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/teacher")
    ap.add_argument("--data", default="data/tokens")
    ap.add_argument("--synthetic", type=int, default=0, help="N synthetic examples instead of --data")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--method", choices=["full", "lora"], default="full")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the median")
    ap.add_argument("--batch-size", type=int, default=4, help="packed rows per micro-batch per GPU")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--recipe", default=None, help="take method, dtype, LoRA, checkpointing, packing and loss settings "
                    "from configs/recipes/NAME.yaml (steps, batch size and data from here)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    ap.add_argument("--allow-cpu", action="store_true", help="run without CUDA (a smoke test; no MFU)")
    ap.add_argument("--out", default=None, help="also write the report as JSON here")
    a = ap.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not a.allow_cpu:
        print("gpu_train: no CUDA device here; nothing to measure (use --allow-cpu for a smoke run)")
        return
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if a.synthetic:
            data = f"{tmp}/tokens"
            synthetic_tokens(Path(data), AutoTokenizer.from_pretrained(a.model), a.synthetic, a.seq_len)
        kw = {"method": a.method, "packing": True, "dtype": "auto", "gradient_checkpointing": a.gradient_checkpointing}
        if a.recipe:
            from stages.tools.recipe import load_recipe

            taken = ("method", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "dtype", "packing",
                     "gradient_checkpointing", "loss_chunk_tokens", "learning_rate", "weight_decay", "lr_scheduler")
            kw.update({k: v for k, v in load_recipe(a.recipe).get("train", {}).items() if k in taken})
        if not cuda and kw["dtype"] != "auto":
            print(f"gpu_train: smoke run on the CPU in float32, not the recipe's {kw['dtype']} "
                  "(slow without CPU bf16 units)")
            kw["dtype"] = "auto"
        p = TrainParams(max_steps=a.steps, batch_size=a.batch_size, warmup_ratio=0.0, checkpoint_every=0,
                        eval_every=0, **kw)
        summary = train(p, data, f"{tmp}/student", f"{tmp}/log", f"{tmp}/checkpoint", student=a.model)
        saved = saved_dtypes(Path(tmp) / "student") if int(os.environ.get("RANK", 0)) == 0 else {}
        rows = (Path(tmp) / "log/plots/metrics/tokens_per_s.tsv").read_text().splitlines()[1:]
        per_step = [float(r.split("\t")[1]) for r in rows][a.warmup_steps:] or [summary["tokens_per_s"]]
        width = json.loads((Path(data) / "meta.json").read_text()).get("max_seq_len", a.seq_len)
    cfg = AutoConfig.from_pretrained(a.model)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        n_params = sum(x.numel() for x in AutoModelForCausalLM.from_config(cfg).parameters())
    tps = statistics.median(per_step)
    per_token = flops_per_token(n_params, cfg.num_hidden_layers, cfg.hidden_size, width, p.method != "full")
    gpus = torch.cuda.device_count() if cuda else 0
    peak = a.peak_tflops or (peak_tflops(device_name) if cuda else None)
    report = {
        "device": device_name, "gpus_used": int(os.environ.get("WORLD_SIZE", 1)) if cuda else 0,
        "gpus_visible": gpus, "precision": "bf16" if cuda and torch.cuda.is_bf16_supported() else "float32",
        "model": a.model, "recipe": a.recipe, "params": n_params, "method": p.method,
        "dtype": saved.get("trained_dtype"), "seq_len": width, "steps": a.steps,
        "tokens_per_s": round(tps, 1), "supervised_tokens_per_s": summary["supervised_tokens_per_s"],
        "padding_efficiency": summary["padding_efficiency"], "peak_memory_mb": summary["peak_memory_mb"],
        "planned_memory_mb": summary["planned_memory_mb"], **plan_errors(summary, cuda),
        "saved_tensor_dtypes": saved.get("tensor_dtypes"), "saved_config_dtype": saved.get("config_dtype"),
        "saved_in_training_dtype": saved.get("ok"),
        "flops_per_token": per_token, "peak_tflops_per_gpu": peak,
        "mfu": round(per_token * tps / (peak * 1e12), 4) if peak and cuda else None,
        "final_loss": round(summary["final_loss"], 4),
    }
    if int(os.environ.get("RANK", 0)) != 0:
        return  # one report per run: the first process's
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
