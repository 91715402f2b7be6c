"""Helpers for the memory benchmarks: run one arm in a fresh process and read its peak RSS."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys


def rss_mb() -> float:
    """This process's peak resident memory so far, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> float:
    """Reset this process's peak RSS (Linux: `5` to /proc/self/clear_refs resets VmHWM) and return the
    current RSS in MiB: measure a step as `peak_since_reset_mb() - reset_peak()`, free of earlier peaks."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_since_reset_mb() -> float:
    return _status_mb("VmHWM")


def run_arm(module: str, args: list[str], threads: int = 2) -> dict:
    """`python -m module --arm-json ... args` in a fresh process (its own peak RSS); its last stdout line as JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def tiny_llama(vocab: int, hidden: int, layers: int, intermediate: int | None = None, heads: int = 4, kv_heads: int = 2,
               seed: int = 0, attention: str = "sdpa"):
    """A randomly initialised Llama-architecture model (Llama-3's shape, scaled down)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=8192, tie_word_embeddings=False, attn_implementation=attention)
    return LlamaForCausalLM(cfg)
