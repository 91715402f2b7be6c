"""The student to train: loaded full or wrapped in LoRA / QLoRA adapters, with its attention implementation.

`build_model` loads it as the train params (`p`, the stage's TrainParams) say: float32 master
weights for full fine-tuning, the frozen base in the training dtype (or 4-bit NF4 for QLoRA) with
float32 adapters for LoRA, gradient checkpointing when asked. `resolve_attention` picks the
attention implementation to load it with, and packed rows switch to `sdpa_packed`
(stages/lib/training/attention.py) where the model is eligible.
"""

from __future__ import annotations

import importlib.util

from stages.lib.errors import StageError
from stages.lib.training.attention import register as register_packed_attention
from stages.lib.training.attention import supports
from stages.lib.training.precision import torch_dtype

ATTENTION = ("auto", "sdpa", "sdpa_packed", "flash_attention_2", "flex_attention", "eager")


def resolve_attention(setting: str, dtype: str) -> str | None:
    """The attention implementation to ask transformers for (None: the model's default)."""
    import torch

    if setting == "sdpa_packed":
        return "sdpa"  # loaded as SDPA, then switched (packed_attention)
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and dtype in ("bfloat16", "float16") and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return None


def dense_packing(p, model) -> bool:
    """Whether packed rows need the dense block mask: asked for, or `auto` with a model class from
    outside transformers (remote code may ignore packed position ids)."""
    if p.packing_mask != "auto":
        return p.packing_mask == "dense"
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return not type(inner).__module__.startswith("transformers.")


def load_kwargs(p, dtype: str, device_index: int | None = None) -> dict:
    """`from_pretrained` arguments: full fine-tuning loads float32 master weights (compute runs under
    autocast); LoRA loads the frozen base in the training dtype; QLoRA quantises it to 4-bit NF4
    (bitsandbytes) with compute in the training dtype."""
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


def build_model(p, student: str, dtype: str = "float32", device_index: int | None = None):
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


def packed_attention(p, model) -> bool:
    """Whether packed rows run `sdpa_packed` (stages.lib.training.attention): packing on the position-ids
    path, the model loaded with SDPA (not flash attention 2, which is varlen already), and plain causal
    attention. `attn_implementation: sdpa_packed` on a model that is not eligible is an error."""
    if not p.packing or p.attn_implementation not in ("auto", "sdpa_packed") or dense_packing(p, model):
        return False
    if model.config._attn_implementation != "sdpa" or not supports(model.config):
        if p.attn_implementation == "sdpa_packed":
            raise StageError(f"train.attn_implementation=sdpa_packed: {type(model).__name__} is not a plain causal "
                             "SDPA model (sliding window or other mask): use auto or sdpa")
        return False
    return True
