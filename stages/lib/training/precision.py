"""Weights dtype: bfloat16 end to end on a GPU that has it, float32 on the CPU.

`resolve_dtype` turns a params value (`auto`, `float32`, `bfloat16`, `float16`) into a torch dtype
name for the device the stage runs on; `torch_dtype` gives the torch object.
"""

from __future__ import annotations

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(setting: str, device: str = "auto") -> str:
    """`auto`: bfloat16 when the device is (or, for `auto`, would be) a CUDA GPU with bf16 support,
    else float32 (the CPU default). Any other value is returned as it is."""
    if setting not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {setting!r}")
    if setting != "auto":
        return setting
    import torch

    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "bfloat16" if on_cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
