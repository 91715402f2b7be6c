"""The schedule of a training run: which examples each micro-batch takes, and each step's learning rate."""

from __future__ import annotations

import math

import numpy as np


def lr_at(step: int, total: int, p) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based) of `total`, under the train params `p`
    (`warmup_ratio`, `lr_scheduler`)."""
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
