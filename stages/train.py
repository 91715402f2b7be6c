"""Stage `train`: fine-tune the student on the token arrays (LoRA or full), with accelerate.

One optimizer step takes `grad_accum` micro-batches; the loss of the step is the summed
cross-entropy over every supervised token of those micro-batches divided by their count
(summed over processes), so gradient accumulation and multi-GPU runs optimise the same
objective. With `objective: kd` or `mix` the loss is (or adds) a divergence from the teacher's captured
top-k log-probabilities (stage `capture`, `stages/lib/training/kd.py`), chunked like the cross-entropy;
`ce` and `kd` are then logged apart. Loss, learning rate and tokens/s go to dvclive (`metrics/train`). The result
is saved as a plain Hugging Face model dir (safetensors + tokenizer); a LoRA run saves
the merged weights, and its adapter in `adapter/`.

`dvc repro` runs `python -m stages.train --config_file ${train.accelerate_config}`, which checks the
params and runs `accelerate launch --config_file ${train.accelerate_config} -m stages.train`, so a failed
run ends with its one-line error and no launcher traceback. One process by default; DDP, FSDP and
multi-node configs are in `configs/accelerate/`. Under FSDP, resume checkpoints are sharded and the final
weights are gathered to rank 0.

The recipe reads top to bottom (torchtune's shape): `setup` (data, model, optimizer, resume),
`step` (one optimizer step over its micro-batches), `finish` (summary, export). The model,
batches and loss, memory plan, checkpoints, export and model card are in stages/lib/training/.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from stages.lib import paths
from stages.lib.errors import StageError, check, check_plain_path
from stages.lib.io import replace_dir, staging_dir
from stages.lib.params import load_params, run_main, set_threads
from stages.lib.progress import log
from stages.lib.student import load_student
from stages.lib.tokens.arrays import TokenSplit, tokenizer_id
from stages.lib.training.batches import (
    IGNORE_INDEX,
    collate,
    collate_packed,
    masked_loss_sum,
    pack,
    pad_id,
    targets_of,
    validation_loss,
)
from stages.lib.training.checkpoint import load_checkpoint, remove_checkpoint, run_fingerprint, save_checkpoint
from stages.lib.training.export import export_model, save_student
from stages.lib.training.kd import KDSpec, masked_kd_sum
from stages.lib.training.memory import peak_memory_mb, plan_memory
from stages.lib.training.model import ATTENTION, build_model, dense_packing
from stages.lib.training.on_policy import on_policy_now
from stages.lib.training.precision import DTYPES, resolve_dtype
from stages.lib.training.schedule import batches, lr_at


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
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                    "up_proj", "down_proj"])
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
    """How dvc.yaml launches this stage (`python -m stages.train --config_file ...`, which runs `accelerate
    launch --config_file ... -m stages.train`): `single.yaml` (CPU or one GPU), `ddp.yaml`, `fsdp.yaml` or
    `multinode.yaml` in configs/accelerate."""
    eval_every: int = 8
    """Validation loss on the held-out split every this many steps and after the last (0: never);
    logged as `val_loss` next to the training loss."""
    objective: str = "ce"
    """`ce`: cross-entropy on the teacher's text (Alpaca's way); `kd`: the divergence from the teacher's captured
    top-k log-probabilities (stage `capture`, which then runs); `mix`: (1 - kd_weight) CE + kd_weight KD."""
    kd_weight: float = 0.5
    """`mix`: the KD share of the loss."""
    divergence: str = "forward_kl"
    """`forward_kl` KL(teacher||student), `reverse_kl` KL(student||teacher), or `jsd` (generalized JSD, `kd_beta`)."""
    kd_beta: float = 0.5
    """`jsd`: its beta, TRL's convention (0: forward KL, 1: reverse KL)."""
    kd_temperature: float = 1.0
    """Both distributions tempered by it (KD terms scaled by its square)."""
    on_policy_ratio: float = 0.0
    """On-policy distillation (GKD's lambda): the share of steps, drawn per step with `seed`, on which the student
    samples completions of the batch's prompts and the loss is the per-token reverse KL to `on_policy_teacher`
    on those samples (stages/lib/training/on_policy.py); the other steps use `objective`. 0: off."""
    on_policy_teacher: str = "models/teacher"
    """On-policy: the teacher scoring the samples, a local model dir or hub id sharing the student's tokenizer
    (resident during training: the memory plan counts it)."""
    on_policy_max_new_tokens: int = 64
    """On-policy: the longest sampled completion."""
    on_policy_temperature: float = 1.0
    """On-policy: the student's sampling temperature."""
    on_policy_k: int = 32
    """On-policy: the teacher's top-k kept per sampled token (plus the rest bucket)."""
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
        self.kd_spec()  # checks objective, divergence, kd_weight, kd_beta, kd_temperature
        check(0 <= self.on_policy_ratio <= 1, "on_policy_ratio: must be in [0, 1]")
        check(self.on_policy_max_new_tokens >= 1 and self.on_policy_k >= 1,
              "on_policy_max_new_tokens and on_policy_k: must be >= 1")
        check(self.on_policy_temperature > 0, "on_policy_temperature: must be > 0")
        check(self.max_memory_gb >= 0 or self.max_memory_gb == -1,
              "max_memory_gb: 0 (the device's), > 0, or -1 (no check)")
        check(self.checkpoint_every >= 0, "checkpoint_every: must be >= 0")
        check(self.eval_every >= 0, "eval_every: must be >= 0")
        check_plain_path(self.accelerate_config, "accelerate_config")  # dvc.yaml pastes it into a shell cmd

    def kd_spec(self) -> KDSpec:
        """The distillation objective these params set (stages/lib/training/kd.py)."""
        return KDSpec(self.objective, self.kd_weight, self.divergence, self.kd_beta, self.kd_temperature)


AUTOCAST = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
"""accelerate's `mixed_precision` for each training dtype."""


@dataclass
class Run:
    """What `setup` builds and `step` and `finish` use: one training run in progress."""

    p: TrainParams
    acc: Any
    student: str
    dtype: str
    data: TokenSplit
    val: TokenSplit
    tok: Any
    plan: Any
    model: Any
    opt: Any
    params: list
    make: Callable[[list[int]], dict]
    """A micro-batch from a list of unit indices (examples, or packed rows)."""
    order: Callable[[list[int]], list[int]]
    """The examples of a micro-batch's unit indices, in its row-major order (the captured teacher rows' order)."""
    captured: Any
    """`kd`/`mix`: the captured teacher (`CapturedSplit` of the train split), else None."""
    on_policy: Any
    """`on_policy_ratio` > 0: (the resident `LocalTeacher`, its `ScoreCache`), else None."""
    total: int
    stream: Iterator[list[int]]
    fingerprint: str
    done: int
    history: list[dict]
    live: Any
    out_dir: str
    checkpoint_dir: str
    log_dir: str
    live_dir: Path | None
    """Where dvclive writes during the run (main process); it replaces `log_dir` at the end."""
    start: float = 0.0
    last_loss: float = float("nan")
    seen: dict = field(default_factory=lambda: {"tokens": 0, "slots": 0, "supervised": 0})


# ---------------------------------------------------------------- setup


def setup(p: TrainParams, data_dir: str, out_dir: str, log_dir: str, checkpoint_dir: str, student: str,
          logprobs_dir: str = paths.LOGPROBS) -> Run:
    """Data, model, optimizer and batches, resumed from a matching checkpoint when there is one."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from dvclive import Live

    dtype = resolve_dtype(p.dtype)
    AcceleratorState._reset_state()  # a second run in one process (tests, benchmarks) may use another precision
    acc = Accelerator(mixed_precision=AUTOCAST[dtype])
    torch.manual_seed(p.seed)
    data, val, tok = _setup_data(data_dir, student)
    captured = _setup_teacher(p, data, logprobs_dir)  # checked before any weights are loaded
    on_policy = _setup_on_policy(p, data)
    longest = int(data.index[:, 1].max())
    seq_len = int(data.meta.get("max_seq_len") or longest) if p.packing else longest
    plan = plan_memory(p, student, dtype, acc, seq_len)
    model = _setup_model(p, student, dtype, acc)
    dense = dense_packing(p, model)
    params, opt = _setup_optimizer(p, model)
    model, opt = acc.prepare(model, opt)
    model.train()
    units, make, order = _setup_batches(p, data, pad_id(tok), dense)
    per_step = p.batch_size * p.grad_accum * acc.num_processes
    total = p.max_steps or math.ceil(p.epochs * len(units) / per_step)
    layout = f" in {len(units)} packed rows ({'dense mask' if dense else 'position ids'})" if p.packing else ""
    log(f"train: {len(data)} examples{layout}, {total} steps of "
        f"{per_step} {'packed rows' if p.packing else 'examples'}, method={p.method}, "
        f"{sum(x.numel() for x in params):,} trainable parameters, {acc.num_processes} process(es)")
    stream = batches(len(units), p.batch_size, p.seed)
    fingerprint = run_fingerprint(p, data, acc.num_processes)
    done, history = load_checkpoint(acc, checkpoint_dir, fingerprint) if p.checkpoint_every else (0, [])
    for _ in range(done * p.grad_accum * acc.num_processes):  # the data position: replay the seeded stream
        next(stream)
    # dvclive logs into a staging folder that replaces `log_dir` only when the student is saved: a killed run
    # leaves the old curves next to the old student, never partial ones (the next run removes the leftovers)
    live_dir = staging_dir(log_dir) if acc.is_main_process else None
    live = Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None) if live_dir else None
    for row in history if live else []:  # the steps before the interruption, as they were logged
        _log_row(live, row)
    return Run(p, acc, student, dtype, data, val, tok, plan, model, opt, params, make, order, captured, on_policy,
               total, stream, fingerprint,
               done, history, live, out_dir, checkpoint_dir, log_dir, live_dir, start=time.monotonic(),
               last_loss=history[-1]["loss"] if history else float("nan"))


def _setup_data(data_dir: str, student: str):
    """(train split, validation split, tokenizer), the tokenizer checked against the one tokenize used."""
    from transformers import AutoTokenizer

    data = TokenSplit(data_dir, "train")
    val = TokenSplit(data_dir, "val")
    if len(data) == 0:
        raise StageError(f"{data_dir}: no training examples (did filter keep anything?)")
    tok = AutoTokenizer.from_pretrained(student)
    if tokenizer_id(tok) != data.meta["tokenizer_id"]:
        raise StageError(f"student.model {student!r} has a different tokenizer than the one {data_dir} was tokenized "
                         f"with ({data.meta['tokenizer']!r}): rerun tokenize (`dvc repro` does)")
    return data, val, tok


def _setup_teacher(p: TrainParams, data: TokenSplit, logprobs_dir: str):
    """`kd`/`mix`: the captured teacher rows of the train split, checked against the tokens (tokenizer, examples,
    each shard's content); None for `ce`."""
    if p.objective == "ce":
        return None
    from stages.lib.logprobs.format import CapturedSplit

    folder = Path(logprobs_dir) / "train"
    if not (folder / "meta.json").is_file():
        raise StageError(f"train.objective={p.objective} needs the teacher's captured log-probabilities in {folder}: "
                         "run the capture stage (`dvc repro` does)")
    captured = CapturedSplit(folder, data)
    log(f"train: objective {p.objective} ({p.divergence}, T={p.kd_temperature}) against {captured.meta['teacher_name']}"
        f"'s top-{captured.meta['identity']['k']}")
    return captured


def _setup_on_policy(p: TrainParams, data: TokenSplit):
    """`on_policy_ratio` > 0: the teacher scoring the student's samples (its tokenizer checked against the tokens'
    now; its weights load on the first on-policy step) and the content-addressed cache of its scores."""
    if p.on_policy_ratio == 0:
        return None
    from stages.lib.logprobs.cache import ScoreCache
    from stages.lib.logprobs.capture import same_tokenizer
    from stages.lib.logprobs.local import LocalTeacher

    teacher = LocalTeacher(p.on_policy_teacher, p.batch_size)
    same_tokenizer(teacher, data.meta)
    return teacher, ScoreCache()


def _setup_model(p: TrainParams, student: str, dtype: str, acc):
    """The student to train, on this process's GPU when there is one."""
    if p.method == "qlora" and acc.distributed_type.value == "FSDP":
        raise StageError("train.method=qlora runs in one process or under DDP, not FSDP: "
                         "use configs/accelerate/ddp.yaml")
    return build_model(p, student, dtype, acc.local_process_index if acc.device.type == "cuda" else None)


def _setup_optimizer(p: TrainParams, model):
    """(trainable parameters, AdamW over them)."""
    import torch

    params = [x for x in model.parameters() if x.requires_grad]
    return params, torch.optim.AdamW(params, lr=p.learning_rate, weight_decay=p.weight_decay)


def _setup_batches(p: TrainParams, data: TokenSplit, pad: int, dense: bool):
    """(the units a batch draws from, a micro-batch from unit indices): packed rows of examples, or examples."""
    if not p.packing:
        return list(range(len(data))), lambda idx: collate([data[i] for i in idx], pad), list
    width = int(data.meta.get("max_seq_len") or data.index[:, 1].max())
    units = pack(data.index[:, 1], width)
    return (units, lambda idx: collate_packed([[data[i] for i in units[u]] for u in idx], width, pad, dense_mask=dense),
            lambda idx: [i for u in idx for i in units[u]])


# ---------------------------------------------------------------- step


def step(run: Run, i: int) -> dict:
    """Optimizer step `i` (0-based): this process's micro-batches, backward on each, one update; logged."""
    import torch

    p, acc = run.p, run.acc
    # each process takes its own micro-batches from the same seeded stream
    micro = [next(run.stream) for _ in range(p.grad_accum * acc.num_processes)]
    mine = micro[acc.process_index :: acc.num_processes]
    group = [run.make(idx) for idx in mine]
    n_local = sum(int((targets_of(b) != IGNORE_INDEX).sum()) for b in group)
    n_global = int(acc.reduce(torch.tensor(n_local, device=acc.device), "sum").item())
    for g in run.opt.param_groups:
        g["lr"] = p.learning_rate * lr_at(i, run.total, p)
    t0 = time.monotonic()
    step_loss, parts = 0.0, {"ce": 0.0, "kd": 0.0}
    sampled = run.on_policy is not None and on_policy_now(i, p.on_policy_ratio, p.seed)
    for j, (idx, b) in enumerate(zip(mine, group)):
        last = j == len(group) - 1
        if sampled:
            loss, got = _on_policy_step(run, run.order(idx), last, i * len(group) + j)
        else:
            loss, got = _loss_step(run, b, run.order(idx), last, n_global)
        step_loss += loss
        for k in parts:
            parts[k] += got[k]
    if p.max_grad_norm > 0:
        acc.clip_grad_norm_(run.params, p.max_grad_norm)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in group)
    slots = sum(b["attention_mask"].numel() for b in group)
    for k, v in (("tokens", tokens), ("slots", slots), ("supervised", n_local)):
        run.seen[k] += v
    run.last_loss = float(acc.reduce(torch.tensor(step_loss, device=acc.device), "sum").item()) / max(1, n_global)
    dt = time.monotonic() - t0
    row = {"loss": run.last_loss, "learning_rate": run.opt.param_groups[0]["lr"],
           "tokens_per_s": tokens * acc.num_processes / dt, "supervised_tokens_per_s": n_global / dt,
           "padding_efficiency": tokens / max(1, slots)}
    if sampled:  # each micro-batch's reverse KL is a mean over its own sampled tokens
        row["on_policy"] = 1.0
        run.last_loss = float(acc.reduce(torch.tensor(step_loss, device=acc.device), "sum").item()) / (
            len(group) * acc.num_processes)
        row["loss"] = run.last_loss
    elif run.on_policy is not None:
        row["on_policy"] = 0.0
    if run.captured is not None and not sampled:  # the two terms apart, per supervised token
        for k, v in parts.items():
            row[k] = float(acc.reduce(torch.tensor(v, device=acc.device), "sum").item()) / max(1, n_global)
    if len(run.val) and p.eval_every and ((i + 1) % p.eval_every == 0 or i + 1 == run.total):
        # every process computes it (under FSDP each forward needs them all)
        row["val_loss"] = validation_loss(run.model, run.val, p.batch_size, pad_id(run.tok), acc.device,
                                          acc.autocast, loss_chunk=p.loss_chunk_tokens)[0] or 0.0
    run.history.append(row)
    if run.live:
        _log_row(run.live, row)
    if acc.is_main_process:
        log(f"train: step {i + 1}/{run.total} loss {run.last_loss:.4f} lr {row['learning_rate']:.2e} "
            f"{tokens / dt:.0f} tok/s" + (f" val_loss {row['val_loss']:.4f}" if "val_loss" in row else ""))
    if p.checkpoint_every and (i + 1) % p.checkpoint_every == 0 and i + 1 < run.total:
        save_checkpoint(acc, run.checkpoint_dir, i + 1, run.fingerprint, run.history)
    return row


def _loss_step(run: Run, batch: dict, examples: list[int], last: bool, n_global: int) -> tuple[float, dict]:
    """Forward and backward of one micro-batch (`examples`: its examples in row-major order); its summed loss and,
    for `kd`/`mix`, its summed CE and KD terms. Gradients are synchronised across processes only on the step's
    last micro-batch (`last`)."""
    acc = run.acc
    batch = {k: v.to(acc.device) for k, v in batch.items()}
    sync = contextlib.nullcontext() if last else acc.no_sync(run.model)
    with sync, acc.autocast():
        if run.captured is None:
            loss_sum, _ = masked_loss_sum(run.model, batch, run.p.loss_chunk_tokens)
            parts = {"ce": 0.0, "kd": 0.0}
        else:
            loss_sum, _, parts = masked_kd_sum(run.model, batch, run.captured.teacher(examples), run.p.kd_spec(),
                                               run.p.loss_chunk_tokens)
        # DDP averages gradients over processes; scale so the result is sum / n_global.
        acc.backward(loss_sum * acc.num_processes / max(1, n_global))
    return loss_sum.item(), parts


def _on_policy_step(run: Run, examples: list[int], last: bool, seed: int) -> tuple[float, dict]:
    """Forward and backward of one on-policy micro-batch: the student samples completions of `examples`' prompts,
    the teacher scores them (cached by content), the loss is the reverse KL averaged over the sampled tokens (and
    over the step's micro-batches and processes). Its mean loss; the KD term is that loss, CE is not computed."""
    from stages.lib.training.on_policy import on_policy_loss, prompt_of

    acc, p = run.acc, run.p
    teacher, cache = run.on_policy
    prompts = [prompt_of(*run.data[e]) for e in examples]
    sync = contextlib.nullcontext() if last else acc.no_sync(run.model)
    with sync, acc.autocast():
        loss_sum, n, _ = on_policy_loss(run.model, teacher, prompts, p.on_policy_k, pad_id(run.tok),
                                        run.tok.eos_token_id, p.on_policy_max_new_tokens, p.on_policy_temperature,
                                        p.seed + seed, cache, run.data.meta.get("template"), p.loss_chunk_tokens,
                                        sampler=acc.unwrap_model(run.model))
        mean = loss_sum / max(1, n)
        acc.backward(mean / p.grad_accum)  # DDP averages over processes: the mean over every micro-batch
    return float(mean.detach()), {"ce": 0.0, "kd": float(mean.detach())}


def _log_row(live, row: dict) -> None:
    for k, v in row.items():
        live.log_metric(k, v)
    live.next_step()


# ---------------------------------------------------------------- finish


def finish(run: Run) -> dict:
    """The run's summary (also dvclive's), the student saved, the checkpoint removed."""
    acc, seen = run.acc, run.seen
    seconds = time.monotonic() - run.start
    summary = {"steps": run.total, "final_loss": run.last_loss, "seconds": round(seconds, 1),
               "tokens_per_s": round(seen["tokens"] * acc.num_processes / seconds, 1),
               "supervised_tokens_per_s": round(seen["supervised"] * acc.num_processes / seconds, 1),
               "padding_efficiency": round(seen["tokens"] / max(1, seen["slots"]), 4),
               "peak_memory_mb": peak_memory_mb(), "planned_memory_mb": round(run.plan.total / 2**20, 1)}
    if run.live:
        for k in ("supervised_tokens_per_s", "padding_efficiency", "peak_memory_mb", "planned_memory_mb"):
            run.live.summary[k] = summary[k]
    acc.wait_for_everyone()
    model = export_model(acc, run.model, run.p, run.student, run.dtype)  # every process: FSDP gathers
    if acc.is_main_process:
        save_student(run.out_dir, model, run.p, run.student, run.dtype, run.tok, run.data)
        run.live.end()
        replace_dir(run.live_dir, Path(run.log_dir))
        remove_checkpoint(run.checkpoint_dir)
    summary["losses"] = [h["loss"] for h in run.history]
    summary["resumed_from_step"] = run.done
    return summary


def train(p: TrainParams, data_dir: str = paths.TOKENS, out_dir: str = paths.STUDENT, log_dir: str = paths.TRAIN_LOG,
          checkpoint_dir: str = paths.CHECKPOINT, *, student: str, logprobs_dir: str = paths.LOGPROBS) -> dict:
    """Fine-tune `student` (a model dir or hub id: params.yaml `student.model`) on the token arrays in
    `data_dir` and save it to `out_dir` (dvclive logs in `log_dir`); the paths are paths.py's unless a
    test gives others. Returns the run's summary."""
    run = setup(p, data_dir, out_dir, log_dir, checkpoint_dir, student, logprobs_dir)
    for i in range(run.done, run.total):
        step(run, i)
    return finish(run)


def main(argv: list[str] | None = None) -> None:
    """`python -m stages.train --config_file X` (dvc.yaml) checks the params, then launches this module under
    `accelerate launch --config_file X` (stages/lib/training/launch.py); `accelerate launch ... -m stages.train`
    runs the training itself."""
    argv = sys.argv[1:] if argv is None else argv
    p = load_params(TrainParams, "train")
    student = paths.local_model(load_student().model, "student.model")
    if argv:
        if len(argv) != 2 or argv[0] != "--config_file":
            raise StageError(f"train: expected no arguments or --config_file FILE, got {' '.join(argv)}")
        from stages.lib.training.launch import launch

        code = launch(argv[1], "stages.train")
        if code:
            sys.exit(code)
        return
    set_threads()
    summary = train(p, student=student)
    log(f"train: done { {k: v for k, v in summary.items() if k != 'losses'} }")


if __name__ == "__main__":
    run_main(main, TrainParams, "train")
