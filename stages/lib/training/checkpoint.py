"""train's resumable checkpoint: what a run must match to resume it, and saving and loading it.

A checkpoint is accelerate's state (model, optimizer, RNG states) plus `progress.json` (the steps
done, the run's fingerprint and the metrics logged so far), swapped in atomically. A run resumes
only from a checkpoint of the same params (those that shape the run) and the same data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from stages.lib.progress import log

NOT_FINGERPRINTED = ("checkpoint_every", "accelerate_config", "eval_every")
"""Train params that do not change the run's result: a checkpoint stays resumable across them."""


def run_fingerprint(p, data, num_processes: int) -> str:
    """What a checkpoint must match to be resumed: every train param (`p`) that shapes the run, the
    data (a `TokenSplit`'s meta and index) and the number of processes."""
    keep = {k: v for k, v in asdict(p).items() if k not in NOT_FINGERPRINTED}
    h = hashlib.sha256(json.dumps([keep, data.meta, num_processes], sort_keys=True).encode())
    h.update(np.ascontiguousarray(data.index).tobytes())
    return h.hexdigest()


def save_checkpoint(acc, checkpoint_dir: str, step: int, fingerprint: str, history: list[dict]) -> None:
    """accelerate state (model, optimizer, RNG) + step and logged metrics, swapped in atomically."""
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


def remove_checkpoint(checkpoint_dir: str) -> None:
    """The run is complete: nothing to resume."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
