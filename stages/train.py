"""Stage `train`: fine-tune the student on the token arrays (LoRA or full), with accelerate.

One optimizer step takes `grad_accum` micro-batches; the loss of the step is the summed
cross-entropy over every supervised token of those micro-batches divided by their count
(summed over processes), so gradient accumulation and multi-GPU runs optimise the same
objective. Loss, learning rate and tokens/s go to dvclive (`metrics/train`). The result
is saved as a plain Hugging Face model dir (safetensors + tokenizer); a LoRA run saves
the merged weights, and its adapter in `adapter/`.

`dvc repro` runs `accelerate launch --config_file ${train.accelerate_config} -m stages.train`:
one process by default; DDP, FSDP and multi-node configs are in `configs/accelerate/`. Under
FSDP, resume checkpoints are sharded and the final weights are gathered to rank 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from stages.lib import paths
from stages.lib.errors import StageError, check, check_plain_path
from stages.lib.io import atomic_dir
from stages.lib.params import load_params, run_main, set_threads
from stages.lib.progress import log
from stages.lib.student import load_student
from stages.lib.tokens.arrays import (TokenSplit, collate, collate_packed, masked_loss_sum, pack, targets_of,
                                      validation_loss)
from stages.lib.tokens.templates import export_tokenizer
from stages.lib.training.attention import register as register_packed_attention
from stages.lib.training.precision import DTYPES, resolve_dtype, torch_dtype


@dataclass
class TrainParams:
    method: str = "lora"
    """`lora` (peft adapters over the frozen base, merged at the end), `qlora` (LoRA over a 4-bit NF4
    base; needs `bitsandbytes` and a CUDA GPU; single process or DDP) or `full` fine-tuning."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA path."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Modules that get adapters ("all-linear" style by default)."""
    max_steps: int = 32
    """Optimizer steps; 0 means run `epochs` epochs."""
    epochs: float = 3.0
    """Epochs when max_steps is 0 (Alpaca: 3)."""
    batch_size: int = 4
    """Examples per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 2e-4
    """Peak learning rate (Alpaca full fine-tuning: 2e-5; LoRA: 1e-4 to 3e-4)."""
    weight_decay: float = 0.0
    """AdamW weight decay (Alpaca: 0)."""
    warmup_ratio: float = 0.03
    """Share of steps spent warming up linearly (Alpaca: 0.03)."""
    lr_scheduler: str = "cosine"
    """`cosine`, `linear` or `constant` after warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    dtype: str = "auto"
    """Training dtype: `auto` (bfloat16 on a GPU that has it, float32 on the CPU), `float32`,
    `bfloat16` or `float16`. Compute runs under autocast in it; LoRA loads the frozen base in it and
    keeps float32 adapters; full fine-tuning keeps float32 master weights and optimizer state. The
    student is saved in it (recorded in the model card and config.json)."""
    gradient_checkpointing: bool = False
    """Trade compute for memory on long sequences."""
    packing: bool = False
    """Bin-pack examples into rows of `tokenize.max_seq_len` tokens (position ids restart per example,
    no attention across examples); `batch_size` then counts rows. Off: dynamic padding per micro-batch."""
    packing_mask: str = "auto"
    """How packed examples are kept apart: `position_ids` (no attention mask: transformers' packed-sequence
    path, varlen flash attention 2, SDPA or flex attention), `dense` (a [rows, 1, L, L] block-diagonal
    mask, memory quadratic in L: the fallback), `auto` (position_ids for transformers' own model
    classes, dense for remote-code models)."""
    attn_implementation: str = "auto"
    """`auto` (flash_attention_2 on a CUDA GPU where `flash_attn` is installed and the dtype is 16-bit;
    else, for packed rows of a plain causal model, `sdpa_packed`: SDPA once per example, no mask;
    else the model's default, SDPA for most), `sdpa`, `sdpa_packed`, `flash_attention_2`,
    `flex_attention` or `eager`."""
    loss_chunk_tokens: int = 0
    """0: the plain loss over full-vocabulary float32 logits. N > 0: chunked cross-entropy over the
    supervised tokens, N tokens' logits at a time (same loss and gradients, far less memory at a
    large vocabulary; e.g. 2048)."""
    max_memory_gb: float = 0
    """The memory plan's limit per process (stages/lib/training/memory.py): 0 is the GPU's memory (on
    the CPU, the machine's RAM / processes); > 0 this many GiB; -1 prints the plan and starts anyway."""
    seed: int = 0
    """Seeds the data order, LoRA init and dropout."""
    accelerate_config: str = "configs/accelerate/single.yaml"
    """How dvc.yaml launches this stage (`accelerate launch --config_file ...`): `single.yaml` (CPU or
    one GPU), `ddp.yaml`, `fsdp.yaml` or `multinode.yaml` in configs/accelerate."""
    eval_every: int = 8
    """Validation loss on the held-out split every this many steps and after the last (0: never);
    logged as `val_loss` next to the training loss."""
    checkpoint_every: int = 8
    """Save a resumable checkpoint (model, optimizer, RNG states, step) to `models/checkpoint` every this
    many steps (0: never); an interrupted run resumes from it when params and data are unchanged, and
    it is removed when training completes."""

    def __post_init__(self):
        check(self.method in ("lora", "qlora", "full"), f"method: expected lora, qlora or full, got {self.method!r}")
        check(self.max_steps > 0 or self.epochs > 0, "set max_steps > 0 or epochs > 0")
        check(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum: must be >= 1")
        check(self.learning_rate > 0, "learning_rate: must be > 0")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio: must be in [0, 1)")
        check(self.lr_scheduler in ("cosine", "linear", "constant"), f"lr_scheduler: unknown {self.lr_scheduler!r}")
        check(self.dtype in DTYPES, f"dtype: expected one of {DTYPES}, got {self.dtype!r}")
        check(self.packing_mask in ("auto", "position_ids", "dense"), f"packing_mask: unknown {self.packing_mask!r}")
        check(self.attn_implementation in ATTENTION, f"attn_implementation: expected one of {ATTENTION}")
        check(self.attn_implementation != "sdpa_packed" or self.packing,
              "attn_implementation: sdpa_packed is for packed rows (packing: true)")
        check(self.loss_chunk_tokens >= 0, "loss_chunk_tokens: must be >= 0")
        check(self.max_memory_gb >= 0 or self.max_memory_gb == -1, "max_memory_gb: 0 (the device's), > 0, or -1 (no check)")
        check(self.checkpoint_every >= 0, "checkpoint_every: must be >= 0")
        check(self.eval_every >= 0, "eval_every: must be >= 0")
        check_plain_path(self.accelerate_config, "accelerate_config")  # dvc.yaml pastes it into a shell cmd


def lr_at(step: int, total: int, p: TrainParams) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based) of `total`."""
    warm = math.ceil(p.warmup_ratio * total)
    if step < warm:
        return (step + 1) / warm
    if p.lr_scheduler == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * progress)) if p.lr_scheduler == "cosine" else 1 - progress


def batches(n: int, batch_size: int, seed: int):
    """Endless stream of index lists: a fresh seeded permutation each epoch, last partial batch kept."""
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size].tolist()
        epoch += 1


def run_fingerprint(p: TrainParams, data: TokenSplit, num_processes: int) -> str:
    """What a checkpoint must match to be resumed: every param that shapes the run, and the data."""
    import hashlib

    skip = ("checkpoint_every", "accelerate_config", "eval_every")
    keep = {k: v for k, v in asdict(p).items() if k not in skip}
    h = hashlib.sha256(json.dumps([keep, data.meta, num_processes], sort_keys=True).encode())
    h.update(np.ascontiguousarray(data.index).tobytes())
    return h.hexdigest()


def save_checkpoint(acc, checkpoint_dir: str, step: int, fingerprint: str, history: list[dict]) -> None:
    """accelerate state (model, optimizer, RNG) + step and logged metrics, swapped in atomically."""
    import shutil
    from pathlib import Path

    final = Path(checkpoint_dir)
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp / "state"), safe_serialization=False)  # keeps tied weights (safetensors drops them)
    if acc.is_main_process:
        (tmp / "progress.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint, "history": history}))
        old = final.with_name(final.name + ".old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
    acc.wait_for_everyone()


def load_checkpoint(acc, checkpoint_dir: str, fingerprint: str) -> tuple[int, list[dict]]:
    """(steps done, logged metrics) from a matching checkpoint, or (0, [])."""
    from pathlib import Path

    path = Path(checkpoint_dir)
    meta = path / "progress.json"
    if not meta.exists():
        return 0, []
    info = json.loads(meta.read_text())
    if info.get("fingerprint") != fingerprint:
        log(f"train: {path} is from other params or data: starting afresh")
        return 0, []
    acc.load_state(str(path / "state"))
    log(f"train: resuming after step {info['step']} from {path}")
    return int(info["step"]), info["history"]


LINEAGE_STAGES = ("seeds", "teacher_model", "generate", "filter", "ingest", "tokenize")


def lineage(lock_path: str = "dvc.lock") -> list[tuple[str, str, str]]:
    """(stage, output, content hash) for every upstream output recorded in dvc.lock."""
    import yaml

    try:
        lock = yaml.safe_load(open(lock_path, encoding="utf-8")) or {}
    except FileNotFoundError:
        return []
    rows = []
    for stage in LINEAGE_STAGES:
        for out in (lock.get("stages", {}).get(stage) or {}).get("outs", []):
            # data and models only: metrics files and the append-only teacher cache (which grows
            # with every other experiment) would change the card without changing the model
            if out["path"].startswith("metrics/") or out["path"].rstrip("/") == paths.TEACHER_CACHE:
                continue
            rows.append((stage, out["path"], out.get("md5") or out.get("hash", "")))
    return rows


def model_card(p: TrainParams, student: str, dtype: str, meta: dict, n_examples: int, n_tokens: int, lines: list[tuple[str, str, str]]) -> str:
    """README.md for the student: what it is, how it was made, and the hashes from seeds to weights."""
    table = "\n".join(f"| `{s}` | `{o}` | `{h}` |" for s, o, h in lines) or "| (no dvc.lock found) | | |"
    params = "\n".join(f"- `{k}`: `{v}`" for k, v in sorted(asdict(p).items()))
    return f"""---
base_model: {student}
library_name: transformers
tags: [stillhouse, distillation, {p.method}]
---

# Student distilled with stillhouse

Fine-tuned from `{student}` ({p.method}) on {n_examples} teacher-written examples
({n_tokens} tokens, template `{meta.get("template")}`, max length {meta.get("max_seq_len")}).
Weights dtype: `{dtype}` (the dtype it was trained in).
The tokenizer's chat template is the training template, so `apply_chat_template` gives the
model its training format; try it with `python -m stages.tools.chat --model <this folder>`.

## Lineage

Content hashes (DVC) of every stage output this model was built from:

| stage | output | hash |
|---|---|---|
{table}

Tokenizer id: `{meta.get("tokenizer_id")}`

## Training params

{params}
"""


def peak_memory_mb() -> float:
    """Peak accelerator memory when on CUDA, else the process's peak resident memory."""
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def resident_bytes() -> float:
    """This process's resident memory now (Linux /proc/self/statm), else its peak so far."""
    import os
    import resource

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_kwargs(p: TrainParams, dtype: str, device_index: int | None = None) -> dict:
    """`from_pretrained` arguments: full fine-tuning loads float32 master weights (compute runs under
    autocast); LoRA loads the frozen base in the training dtype; QLoRA quantises it to 4-bit NF4
    (bitsandbytes) with compute in the training dtype."""
    import importlib.util

    import torch

    if p.method == "full":
        return {"dtype": torch.float32}
    if p.method == "lora":
        return {"dtype": torch_dtype(dtype)}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise StageError("train.method=qlora needs the `bitsandbytes` package (and a CUDA GPU): pip install "
                         "bitsandbytes, or use method=lora (a bf16 base on a 24 GB GPU fits models up to ~8B)")
    if not torch.cuda.is_available():
        raise StageError("train.method=qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); use method=lora on the CPU")
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch_dtype(dtype))
    return {"dtype": torch_dtype(dtype), "quantization_config": q, "device_map": {"": device_index or 0}}


def build_model(p: TrainParams, student: str, dtype: str = "float32", device_index: int | None = None):
    """The student to train: full (float32 master weights) or wrapped in LoRA adapters, which are
    float32 whatever the dtype of the frozen base."""
    from transformers import AutoModelForCausalLM

    attention = resolve_attention(p.attn_implementation, dtype)
    extra = {"attn_implementation": attention} if attention else {}
    model = AutoModelForCausalLM.from_pretrained(student, **load_kwargs(p, dtype, device_index), **extra)
    if packed_attention(p, model):
        model.set_attn_implementation(register_packed_attention())  # training only: never saved in config.json
    if p.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=p.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if p.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (LoRA), FSDP and no_sync
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if p.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                         target_modules=p.lora_target_modules, task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        for x in model.parameters():
            if x.requires_grad:
                x.data = x.data.float()  # adapters (and their Adam state) in float32 over a bf16 / 4-bit base
    return model


ATTENTION = ("auto", "sdpa", "sdpa_packed", "flash_attention_2", "flex_attention", "eager")


def resolve_attention(setting: str, dtype: str) -> str | None:
    """The attention implementation to ask transformers for (None: the model's default)."""
    import importlib.util

    import torch

    if setting == "sdpa_packed":
        return "sdpa"  # loaded as SDPA, then switched (packed_attention)
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and dtype in ("bfloat16", "float16") and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return None


def dense_packing(p: TrainParams, model) -> bool:
    """Whether packed rows need the dense block mask: asked for, or `auto` with a model class from
    outside transformers (remote code may ignore packed position ids)."""
    if p.packing_mask != "auto":
        return p.packing_mask == "dense"
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return not type(inner).__module__.startswith("transformers.")


def save_adapter(model, folder) -> None:
    """The LoRA adapter as peft saves it, with `target_modules` sorted: peft writes them from a Python
    set, whose order changes with the interpreter's hash seed, so the same run gave another
    adapter_config.json, and another `models/student` hash, each time."""
    from pathlib import Path

    model.save_pretrained(folder)
    path = Path(folder) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def packed_attention(p: TrainParams, model) -> bool:
    """Whether packed rows run `sdpa_packed` (stages.lib.training.attention): packing on the position-ids
    path, the model loaded with SDPA (not flash attention 2, which is varlen already), and plain causal
    attention. `attn_implementation: sdpa_packed` on a model that is not eligible is an error."""
    from stages.lib.training.attention import supports

    if not p.packing or p.attn_implementation not in ("auto", "sdpa_packed") or dense_packing(p, model):
        return False
    if model.config._attn_implementation != "sdpa" or not supports(model.config):
        if p.attn_implementation == "sdpa_packed":
            raise StageError(f"train.attn_implementation=sdpa_packed: {type(model).__name__} is not a plain causal "
                             "SDPA model (sliding window or other mask): use auto or sdpa")
        return False
    return True


AUTOCAST = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
"""accelerate's `mixed_precision` for each training dtype."""


def export_model(acc, model, p: TrainParams, student: str, dtype: str):
    """The trained student as a plain transformers model on the main process (None elsewhere), and
    its LoRA adapter state. Every process must call this: under FSDP the full weights are gathered
    from the shards (`get_state_dict`) and loaded into a fresh copy on the CPU before merging;
    otherwise the unwrapped model is used as it is."""
    from accelerate.utils import DistributedType

    state = acc.get_state_dict(model) if acc.distributed_type == DistributedType.FSDP else None
    if not acc.is_main_process:
        return None
    model = acc.unwrap_model(model)
    if state is not None:
        model = rebuild(p, student, dtype, state)
    return model


def merged(model, p: TrainParams, student: str, dtype: str):
    """The LoRA student with its adapters merged into plain weights. A QLoRA base is 4-bit: the adapters
    are merged into the base reloaded in the training dtype instead (the 4-bit rounding is not saved)."""
    if p.method == "lora":
        return model.merge_and_unload()
    import tempfile

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        base = AutoModelForCausalLM.from_pretrained(student, dtype=torch_dtype(dtype))
        return PeftModel.from_pretrained(base, tmp).merge_and_unload()


def rebuild(p: TrainParams, student: str, dtype: str, state: dict):
    """A fresh student (same LoRA wrapping) on the CPU holding a gathered full state dict."""
    model = build_model(p, student, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights (lm_head = embed_tokens) may be absent from a gathered state dict
    missing = [k for k in missing if "lm_head" not in k]
    if missing or unexpected:
        raise StageError(f"train: gathered weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def device_memory(acc) -> float:
    """Bytes one process may use: the GPU's memory, or on the CPU the machine's RAM shared by the processes."""
    import os

    import torch

    if acc.device.type == "cuda":
        return torch.cuda.get_device_properties(acc.device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, acc.num_processes)


def plan_for(p: TrainParams, cfg, dtype: str, seq_len: int, processes: int, fsdp: bool, overhead: float):
    """The memory plan (stages/lib/training/memory.py) of these params for a model config."""
    from stages.lib.training import memory

    return memory.estimate(cfg, method=p.method, dtype=dtype, micro_batch=p.batch_size, seq_len=seq_len,
                           gradient_checkpointing=p.gradient_checkpointing, processes=processes, fsdp=fsdp,
                           optimizer="adamw", lora_r=p.lora_r, lora_targets=p.lora_target_modules,
                           lora_dropout=p.lora_dropout, loss_chunk=p.loss_chunk_tokens,
                           attention=resolve_attention(p.attn_implementation, dtype) or "sdpa", overhead=overhead,
                           grad_accum=p.grad_accum)


def plan_memory(p: TrainParams, student: str, dtype: str, acc, seq_len: int):
    """The memory plan of this run (per process), logged; a StageError when it exceeds the limit."""
    from accelerate.utils import DistributedType
    from transformers import AutoConfig

    from stages.lib.training import memory

    on_gpu = acc.device.type == "cuda"
    baseline = memory.CUDA_OVERHEAD if on_gpu else resident_bytes()
    fsdp = acc.distributed_type == DistributedType.FSDP
    plan = plan_for(p, AutoConfig.from_pretrained(student), dtype, seq_len, acc.num_processes, fsdp, baseline)
    limit = p.max_memory_gb * memory.GIB if p.max_memory_gb > 0 else device_memory(acc)
    if acc.is_main_process:
        log(f"train: memory plan per process: {plan.table()} (limit {limit / memory.GIB:.1f} GiB)")
    if not on_gpu and plan.total * memory.GLIBC_RETENTION > limit and memory.pin_mmap_threshold():
        log("train: memory is tight on this CPU: glibc's mmap threshold is pinned, so freed tensors leave the "
            "process (resident memory then follows the plan; steps are ~30% slower)")
    problem = memory.check(plan, limit, p.method, fsdp, acc.num_processes, p.batch_size, p.gradient_checkpointing,
                           p.loss_chunk_tokens)
    if problem and p.max_memory_gb != -1:
        raise StageError(f"train: {problem}")
    return plan


def train(p: TrainParams, data_dir: str = paths.TOKENS, out_dir: str = paths.STUDENT, log_dir: str = paths.TRAIN_LOG,
          checkpoint_dir: str = paths.CHECKPOINT, *, student: str) -> dict:
    """Fine-tune `student` (a model dir or hub id: params.yaml `student.model`) on the token arrays in
    `data_dir` and save it to `out_dir` (dvclive logs in `log_dir`); the paths are paths.py's unless a
    test gives others."""
    import torch
    from accelerate import Accelerator
    from dvclive import Live
    from transformers import AutoTokenizer

    from stages.lib.tokens.arrays import tokenizer_id

    from accelerate.state import AcceleratorState

    dtype = resolve_dtype(p.dtype)
    AcceleratorState._reset_state()  # a second run in one process (tests, benchmarks) may use another precision
    acc = Accelerator(mixed_precision=AUTOCAST[dtype])
    torch.manual_seed(p.seed)
    data = TokenSplit(data_dir, "train")
    val = TokenSplit(data_dir, "val")
    if len(data) == 0:
        raise StageError(f"{data_dir}: no training examples (did filter keep anything?)")
    tok = AutoTokenizer.from_pretrained(student)
    if tokenizer_id(tok) != data.meta["tokenizer_id"]:
        raise StageError(f"student.model {student!r} has a different tokenizer than the one {data_dir} was tokenized "
                         f"with ({data.meta['tokenizer']!r}): rerun tokenize (`dvc repro` does)")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seq_len = int(data.meta.get("max_seq_len") or data.index[:, 1].max()) if p.packing else int(data.index[:, 1].max())
    plan = plan_memory(p, student, dtype, acc, seq_len)
    model = build_model(p, student, dtype, acc.local_process_index if acc.device.type == "cuda" else None)
    dense = dense_packing(p, model)
    params = [x for x in model.parameters() if x.requires_grad]
    opt = torch.optim.AdamW(params, lr=p.learning_rate, weight_decay=p.weight_decay)
    if p.method == "qlora" and acc.distributed_type.value == "FSDP":
        raise StageError("train.method=qlora runs in one process or under DDP, not FSDP: use configs/accelerate/ddp.yaml")
    model, opt = acc.prepare(model, opt)
    model.train()
    per_step = p.batch_size * p.grad_accum * acc.num_processes
    if p.packing:
        width = int(data.meta.get("max_seq_len") or data.index[:, 1].max())
        units = pack(data.index[:, 1], width)

        def make(idx):
            return collate_packed([[data[i] for i in units[u]] for u in idx], width, pad_id, dense_mask=dense)
    else:
        units = list(range(len(data)))

        def make(idx):
            return collate([data[i] for i in idx], pad_id)
    total = p.max_steps or math.ceil(p.epochs * len(units) / per_step)
    stream = batches(len(units), p.batch_size, p.seed)
    unit = "packed rows" if p.packing else "examples"
    layout = f" in {len(units)} packed rows ({'dense mask' if dense else 'position ids'})" if p.packing else ""
    log(f"train: {len(data)} examples{layout}, {total} steps of "
        f"{per_step} {unit}, method={p.method}, "
        f"{sum(x.numel() for x in params):,} trainable parameters, {acc.num_processes} process(es)")
    fingerprint = run_fingerprint(p, data, acc.num_processes)
    done, history = load_checkpoint(acc, checkpoint_dir, fingerprint) if p.checkpoint_every else (0, [])
    for _ in range(done * p.grad_accum * acc.num_processes):  # the data position: replay the seeded stream
        next(stream)
    live = Live(dir=log_dir, dvcyaml=False, save_dvc_exp=False, report=None) if acc.is_main_process else None
    if live:
        for row in history:  # the steps before the interruption, as they were logged
            for k, v in row.items():
                live.log_metric(k, v)
            live.next_step()
    start = time.monotonic()
    seen_tokens = seen_slots = seen_supervised = 0
    last_loss = history[-1]["loss"] if history else float("nan")
    for step in range(done, total):
        # each process takes its own micro-batches from the same seeded stream
        micro = [next(stream) for _ in range(p.grad_accum * acc.num_processes)]
        mine = micro[acc.process_index :: acc.num_processes]
        group = [make(idx) for idx in mine]
        n_local = sum(int((targets_of(b) != -100).sum()) for b in group)
        n_global = int(acc.reduce(torch.tensor(n_local, device=acc.device), "sum").item())
        for g in opt.param_groups:
            g["lr"] = p.learning_rate * lr_at(step, total, p)
        t0 = time.monotonic()
        step_loss = 0.0
        for j, b in enumerate(group):
            b = {k: v.to(acc.device) for k, v in b.items()}
            # gradients are synchronised across processes only on the last micro-batch
            sync = contextlib.nullcontext() if j == len(group) - 1 else acc.no_sync(model)
            with sync, acc.autocast():
                loss_sum, _ = masked_loss_sum(model, b, p.loss_chunk_tokens)
                # DDP averages gradients over processes; scale so the result is sum / n_global.
                acc.backward(loss_sum * acc.num_processes / max(1, n_global))
            step_loss += loss_sum.item()
        if p.max_grad_norm > 0:
            acc.clip_grad_norm_(params, p.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens = sum(int(b["attention_mask"].sum()) for b in group)
        slots = sum(b["attention_mask"].numel() for b in group)
        seen_tokens += tokens
        seen_slots += slots
        seen_supervised += n_local
        last_loss = float(acc.reduce(torch.tensor(step_loss, device=acc.device), "sum").item()) / max(1, n_global)
        dt = time.monotonic() - t0
        row = {"loss": last_loss, "learning_rate": opt.param_groups[0]["lr"],
               "tokens_per_s": tokens * acc.num_processes / dt, "supervised_tokens_per_s": n_global / dt,
               "padding_efficiency": tokens / max(1, slots)}
        if len(val) and p.eval_every and ((step + 1) % p.eval_every == 0 or step + 1 == total):
            # every process computes it (under FSDP each forward needs them all)
            row["val_loss"] = validation_loss(model, val, p.batch_size, pad_id, acc.device, acc.autocast,
                                              loss_chunk=p.loss_chunk_tokens)[0] or 0.0
        history.append(row)
        if live:
            for k, v in row.items():
                live.log_metric(k, v)
            live.next_step()
        if acc.is_main_process:
            log(f"train: step {step + 1}/{total} loss {last_loss:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{tokens / dt:.0f} tok/s" + (f" val_loss {row['val_loss']:.4f}" if "val_loss" in row else ""))
        if p.checkpoint_every and (step + 1) % p.checkpoint_every == 0 and step + 1 < total:
            save_checkpoint(acc, checkpoint_dir, step + 1, fingerprint, history)
    seconds = time.monotonic() - start
    summary = {"steps": total, "final_loss": last_loss, "seconds": round(seconds, 1),
               "tokens_per_s": round(seen_tokens * acc.num_processes / seconds, 1),
               "supervised_tokens_per_s": round(seen_supervised * acc.num_processes / seconds, 1),
               "padding_efficiency": round(seen_tokens / max(1, seen_slots), 4),
               "peak_memory_mb": peak_memory_mb(), "planned_memory_mb": round(plan.total / 2**20, 1)}
    if live:
        for k in ("supervised_tokens_per_s", "padding_efficiency", "peak_memory_mb", "planned_memory_mb"):
            live.summary[k] = summary[k]
    acc.wait_for_everyone()
    model = export_model(acc, model, p, student, dtype)
    if acc.is_main_process:
        with atomic_dir(out_dir) as out:
            if p.method in ("lora", "qlora"):
                save_adapter(model, out / "adapter")
                model = merged(model, p, student, dtype)
            model.to(torch_dtype(dtype)).save_pretrained(out, safe_serialization=True)  # in the dtype it was trained in
            export_tokenizer(tok, data.meta.get("template", "chat")).save_pretrained(out)
            (out / "README.md").write_text(model_card(p, student, dtype, data.meta, len(data), int(data.index[:, 1].sum()), lineage()))
            # no timings here: the checkpoint dir should depend only on params and data
            (out / "stillhouse_train.json").write_text(json.dumps({"params": asdict(p), "dtype": dtype, "data": data.meta}, indent=2, sort_keys=True))
        live.end()
        import shutil

        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the run is complete: nothing to resume
    summary["losses"] = [h["loss"] for h in history]
    summary["resumed_from_step"] = done
    return summary


def main() -> None:
    p = load_params(TrainParams, "train")
    set_threads()
    summary = train(p, student=load_student().model)
    log(f"train: done { {k: v for k, v in summary.items() if k != 'losses'} }")


if __name__ == "__main__":
    run_main(main, TrainParams, "train")
