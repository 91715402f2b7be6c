"""The trained student as it is saved: gathered, merged, cast to its training dtype, with its card.

`export_model` gathers the weights to the main process (under FSDP from the shards), `merged` folds
LoRA adapters into plain weights, and `save_student` writes the Hugging Face model dir: safetensors
in the training dtype, the LoRA adapter in `adapter/`, the tokenizer with the training template as
its chat template, the model card and `stillhouse_train.json` (params, dtype and data meta; no
timings, so the folder depends only on params and data).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from stages.lib.errors import StageError
from stages.lib.io import atomic_dir
from stages.lib.tokens.templates import export_tokenizer
from stages.lib.training.card import lineage, model_card
from stages.lib.training.model import build_model
from stages.lib.training.precision import torch_dtype


def save_adapter(model, folder) -> None:
    """The LoRA adapter as peft saves it, with `target_modules` sorted: peft writes them from a Python
    set, whose order changes with the interpreter's hash seed, so the same run gave another
    adapter_config.json, and another `models/student` hash, each time."""
    model.save_pretrained(folder)
    path = Path(folder) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def export_model(acc, model, p, student: str, dtype: str):
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


def merged(model, p, student: str, dtype: str):
    """The LoRA student with its adapters merged into plain weights. A QLoRA base is 4-bit: the adapters
    are merged into the base reloaded in the training dtype instead (the 4-bit rounding is not saved)."""
    if p.method == "lora":
        return model.merge_and_unload()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        base = AutoModelForCausalLM.from_pretrained(student, dtype=torch_dtype(dtype))
        return PeftModel.from_pretrained(base, tmp).merge_and_unload()


def rebuild(p, student: str, dtype: str, state: dict):
    """A fresh student (same LoRA wrapping) on the CPU holding a gathered full state dict."""
    model = build_model(p, student, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights (lm_head = embed_tokens) may be absent from a gathered state dict
    missing = [k for k in missing if "lm_head" not in k]
    if missing or unexpected:
        raise StageError(f"train: gathered weights do not fit the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model




def save_student(out_dir: str, model, p, student: str, dtype: str, tok, data) -> None:
    """The student folder (main process only): `model` as `export_model` gave it, `data` the train split."""
    with atomic_dir(out_dir) as out:
        if p.method in ("lora", "qlora"):
            save_adapter(model, out / "adapter")
            model = merged(model, p, student, dtype)
        model.to(torch_dtype(dtype)).save_pretrained(out, safe_serialization=True)  # in the dtype it was trained in
        export_tokenizer(tok, data.meta.get("template", "chat")).save_pretrained(out)
        card = model_card(p, student, dtype, data.meta, len(data), int(data.index[:, 1].sum()), lineage())
        (out / "README.md").write_text(card)
        info = {"params": asdict(p), "dtype": dtype, "data": data.meta}
        (out / "stillhouse_train.json").write_text(json.dumps(info, indent=2, sort_keys=True))
