"""A memory plan before launch: estimated peak memory per GPU (or per process on the CPU).

From the model config (layers, hidden, intermediate, vocabulary, heads), the method (full, LoRA,
QLoRA), the dtype, the optimizer, the micro-batch and sequence length, gradient checkpointing,
the number of processes and FSDP sharding, `estimate` adds up, in bytes:

- weights: full fine-tuning keeps float32 master weights (+ a 16-bit copy under autocast); LoRA the
  frozen base in the training dtype; QLoRA 4-bit NF4 linears (0.5625 B/param with the quantisation
  constants) and 16-bit embeddings; plus float32 adapters;
- gradients (float32, trainable parameters) and optimizer state (AdamW: 8 B per trainable param);
  under FSDP all three are divided by the number of processes, and two decoder layers (the one
  computing and the one prefetched) plus the embeddings are held unsharded;
- activations kept for backward per token and layer (Llama-style decoder: norms in float32,
  q/k/v/o, the SwiGLU MLP; eager attention adds the score matrices), or one layer's input per layer
  plus one layer recomputed with gradient checkpointing;
- the loss: full-vocabulary logits (16-bit logits, their float32 copy, log-softmax and gradient),
  or one chunk's with chunked cross-entropy;
- a fixed overhead (CUDA context and allocator: 1 GiB; on the CPU, the process's own baseline).

Not all of it is live at once. `set_to_none` frees the gradients after each optimizer step, and
autograd frees each layer's activations as its gradients are made, so a step peaks in one of two
phases (measured phase by phase on SmolLM2-135M, docs/scaling.md):
- backward: the activations and the loss, plus the gradients only when an earlier micro-batch's
  are held (`grad_accum` > 1);
- the optimizer step: the gradients plus AdamW's temporaries (the foreach implementation, the
  default on a GPU, makes one float32 tensor per parameter: `torch._foreach_sqrt` of the second
  moments).
The weights, the optimizer state, DDP's gradient buckets (`gradient_as_bucket_view=False`, the
default: one more copy of the gradients) and the overhead are live in both.

`check` compares the total with the device's memory and says what to change when it does not fit.
The plan counts live tensors. On the CPU, glibc's allocator keeps freed heap memory resident, so
with its default (dynamic) mmap threshold a process's peak RSS ran up to 1.59x the live peak
(`GLIBC_RETENTION` allows 1.75x); train pins the threshold (`pin_mmap_threshold`) when that much would not
fit, and resident memory then follows the plan.
The estimate is checked against measured peaks in benchmarks/memory_plan.py (docs/scaling.md).

The glue train calls (the end of this module): `plan_memory` makes, logs and checks the plan of a
run from its train params, `peak_memory_mb` reports the peak it reached.
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass

from stages.lib.errors import StageError
from stages.lib.progress import log
from stages.lib.training.model import resolve_attention

GIB = 2**30
CUDA_OVERHEAD = 1 * GIB
"""The plan's fixed overhead on a GPU: the CUDA context and the caching allocator's slack."""
MMAP_THRESHOLD = 128 * 1024
"""glibc's default M_MMAP_THRESHOLD, pinned: blocks from 128 KiB up are mmapped and unmapped when freed."""
GLIBC_RETENTION = 1.75
"""Peak RSS over the plan with glibc's dynamic threshold, with a margin: 1.48 to 1.59 measured (SmolLM2-135M
LoRA, docs/scaling.md)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Shape:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool

    @classmethod
    def of(cls, cfg) -> "Shape":
        """From a transformers config (or a dict of its fields)."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        heads = get("num_attention_heads")
        return cls(layers=get("num_hidden_layers"), hidden=get("hidden_size"), intermediate=get("intermediate_size"),
                   vocab=get("vocab_size"), heads=heads, kv_heads=get("num_key_value_heads") or heads,
                   tied=bool(get("tie_word_embeddings", False)))

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden

    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embed_params()

    def lora_params(self, r: int, targets=LORA_TARGETS) -> int:
        return self.layers * sum(r * (a + b) for name, (a, b) in self.linear_shapes().items() if name in targets)


@dataclass
class Plan:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    loss: float
    overhead: float
    params: int
    trainable: int
    buckets: float = 0
    """DDP's bucket copy of the gradients."""
    step_temporaries: float = 0
    """The optimizer step's own tensors."""
    held_gradients: bool = False
    """The gradients live through the forward and backward (accumulated over micro-batches)."""
    teacher: float = 0
    """On-policy distillation: the resident teacher's weights, and the KV caches of sampling (student) and
    scoring (teacher) a micro-batch of prompts plus the completions."""

    @property
    def backward_phase(self) -> float:
        return self.activations + self.loss + (self.gradients if self.held_gradients else 0)

    @property
    def step_phase(self) -> float:
        return self.gradients + self.step_temporaries

    @property
    def total(self) -> float:
        return (self.weights + self.optimizer + self.buckets + self.overhead + self.teacher
                + max(self.backward_phase, self.step_phase))

    def table(self) -> str:
        skip = ("params", "trainable", "held_gradients")
        rows = {**{k: v for k, v in asdict(self).items() if k not in skip and v}, "total": self.total}
        phase = "backward" if self.backward_phase >= self.step_phase else "the optimizer step"
        return ", ".join(f"{k} {v / GIB:.2f}" for k, v in rows.items()) + f" GiB (peak in {phase})"


def estimate(cfg, method: str = "lora", dtype: str = "bfloat16", micro_batch: int = 1, seq_len: int = 512,
             gradient_checkpointing: bool = False, processes: int = 1, fsdp: bool = False, optimizer: str = "adamw",
             lora_r: int = 16, lora_targets=LORA_TARGETS, lora_dropout: float = 0.05, loss_chunk: int = 0,
             attention: str = "sdpa", overhead: float = CUDA_OVERHEAD, grad_accum: int = 1) -> Plan:
    """Peak memory per process of one training step (see the module docstring for the terms)."""
    s = Shape.of(cfg)
    b = DTYPE_BYTES[dtype]
    n = s.params()
    shard = processes if fsdp else 1
    if method == "full":
        trainable = n
        weights = 4 * n + (2 * n if b == 2 and not fsdp else 0)
    else:
        trainable = s.lora_params(lora_r, lora_targets)
        linear = s.layers * sum(a * c for a, c in s.linear_shapes().values())
        base = 0.5625 * linear + b * (n - linear) if method == "qlora" else b * n
        weights = base + 4 * trainable
    gradients = 4 * trainable
    optim = {"adamw": 8, "sgd": 0, "adamw8bit": 2}[optimizer] * trainable
    if fsdp:
        weights, gradients, optim = weights / shard, gradients / shard, optim / shard
        unsharded = 2 * s.layer_params() + s.embed_params()  # the working set, gathered in 16-bit or float32
        weights += b * unsharded
    tokens = micro_batch * seq_len
    h, i, kv = s.hidden, s.intermediate, s.kv_dim
    per_layer = b * (8 * h + 2 * kv + 4 * i) + 4 * 4 * h  # stored tensors; RMSNorm upcasts to float32
    if method != "full" and lora_dropout > 0:
        per_layer += b * (6 * h + i)  # each adapted linear keeps its dropped-out input
    if attention == "eager":
        per_layer += 3 * b * s.heads * seq_len  # scores, softmax, dropout: quadratic in seq_len
    if gradient_checkpointing:
        activations = tokens * (s.layers * b * h + per_layer)
    else:
        activations = tokens * s.layers * per_layer
    logit_tokens = min(tokens, loss_chunk) if loss_chunk else tokens
    loss = logit_tokens * s.vocab * (b + 4 + 4 + 4 if b == 2 else 4 + 4 + 4)
    ddp = processes > 1 and not fsdp
    return Plan(weights=weights, gradients=gradients, optimizer=optim, activations=activations, loss=loss,
                overhead=overhead, params=n, trainable=trainable, buckets=gradients if ddp else 0,
                step_temporaries=4 * trainable / shard if optimizer != "sgd" else 0, held_gradients=grad_accum > 1)


def check(plan: Plan, device_bytes: float, method: str, fsdp: bool, processes: int, micro_batch: int,
          gradient_checkpointing: bool, loss_chunk: int) -> str | None:
    """None when the plan fits in `device_bytes`, else a message saying by how much it does not and
    what would make it fit."""
    if plan.total <= device_bytes:
        return None
    tips = []
    if method == "full" and not fsdp:
        tips.append("shard it: train.accelerate_config=configs/accelerate/fsdp.yaml "
                    "(weights, gradients and Adam state / GPUs)")
    if method == "full":
        tips.append("train.method=lora (frozen 16-bit base, small float32 adapters) or qlora (4-bit base)")
    if plan.activations > 0.2 * plan.total and not gradient_checkpointing:
        tips.append("train.gradient_checkpointing=true (activations of one layer at a time)")
    if plan.loss > 0.1 * plan.total and not loss_chunk:
        tips.append("train.loss_chunk_tokens=2048 (no full-vocabulary logits)")
    if micro_batch > 1:
        tips.append(f"a smaller train.batch_size (now {micro_batch}) with a larger grad_accum (same global batch)")
    return (f"memory plan: {plan.total / GIB:.1f} GiB per process ({plan.table()}) exceeds the device's "
            f"{device_bytes / GIB:.1f} GiB. Try: " + "; ".join(tips or ["a larger GPU"]) +
            ". (train.max_memory_gb=-1 starts anyway.)")


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold, so that tensors freed on the CPU go back to the system at once.

    glibc raises the threshold to the size of each mmapped block that is freed (up to 32 MiB;
    mallopt(3)), after which activation-sized tensors come from the heap, whose freed memory stays
    resident: SmolLM2-135M's LoRA step measured 5.8 GiB of RSS for 3.7 GiB of live tensors.
    Setting the threshold turns that adjustment off. It costs page faults: 22-34% fewer tokens/s
    on the CPU (docs/scaling.md), so train pins it only when memory is tight. A
    MALLOC_MMAP_THRESHOLD_ in the environment is the user's choice and is left as it is. True when
    set; False elsewhere (not glibc) or when left to the environment.
    """
    import ctypes
    import ctypes.util

    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD = -3  # malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


# ---------------------------------------------------------------- train's plan and peak


def peak_memory_mb() -> float:
    """Peak accelerator memory when on CUDA, else the process's peak resident memory."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def resident_bytes() -> float:
    """This process's resident memory now (Linux /proc/self/statm), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_memory(acc) -> float:
    """Bytes one process may use: the GPU's memory, or on the CPU the machine's RAM shared by the processes."""
    import torch

    if acc.device.type == "cuda":
        return torch.cuda.get_device_properties(acc.device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, acc.num_processes)


def plan_for(p, cfg, dtype: str, seq_len: int, processes: int, fsdp: bool, overhead: float):
    """The memory plan of these train params (`p`) for a model config."""
    return estimate(cfg, method=p.method, dtype=dtype, micro_batch=p.batch_size, seq_len=seq_len,
                    gradient_checkpointing=p.gradient_checkpointing, processes=processes, fsdp=fsdp,
                    optimizer="adamw", lora_r=p.lora_r, lora_targets=p.lora_target_modules,
                    lora_dropout=p.lora_dropout, loss_chunk=p.loss_chunk_tokens,
                    attention=resolve_attention(p.attn_implementation, dtype) or "sdpa", overhead=overhead,
                    grad_accum=p.grad_accum)


def on_policy_bytes(teacher_cfg, student_cfg, dtype: str, micro_batch: int, seq_len: int) -> float:
    """The resident teacher (its weights in `dtype`) plus the student's and the teacher's KV caches for a micro-batch
    of `seq_len` tokens (prompt and completion), 2 (K, V) x layers x KV width per token."""
    b = DTYPE_BYTES[dtype]

    def kv(cfg) -> float:
        s = Shape.of(cfg)
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        width = heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        return 2 * s.layers * width * b * micro_batch * seq_len

    return b * Shape.of(teacher_cfg).params() + kv(teacher_cfg) + kv(student_cfg)


def plan_memory(p, student: str, dtype: str, acc, seq_len: int):
    """The memory plan of this run (per process), logged; a StageError when it exceeds the limit."""
    from accelerate.utils import DistributedType
    from transformers import AutoConfig

    on_gpu = acc.device.type == "cuda"
    baseline = CUDA_OVERHEAD if on_gpu else resident_bytes()
    fsdp = acc.distributed_type == DistributedType.FSDP
    cfg = AutoConfig.from_pretrained(student)
    plan = plan_for(p, cfg, dtype, seq_len, acc.num_processes, fsdp, baseline)
    if getattr(p, "on_policy_ratio", 0) > 0:
        plan.teacher = on_policy_bytes(AutoConfig.from_pretrained(p.on_policy_teacher), cfg, dtype, p.batch_size,
                                       seq_len + p.on_policy_max_new_tokens)
    limit = p.max_memory_gb * GIB if p.max_memory_gb > 0 else device_memory(acc)
    if acc.is_main_process:
        log(f"train: memory plan per process: {plan.table()} (limit {limit / GIB:.1f} GiB)")
    problem = check(plan, limit, p.method, fsdp, acc.num_processes, p.batch_size, p.gradient_checkpointing,
                    p.loss_chunk_tokens)
    if problem and p.max_memory_gb != -1:
        raise StageError(f"train: {problem}")  # refused: nothing about how the run would have gone
    if not on_gpu and plan.total * GLIBC_RETENTION > limit and pin_mmap_threshold():
        log("train: memory is tight on this CPU: glibc's mmap threshold is pinned, so freed tensors leave the "
            "process (resident memory then follows the plan; steps are ~30% slower)")
    return plan
