"""Token arrays written by `tokenize`, read back for `train` and `evaluate`.

`TokenSplit` memory-maps one split; `collate` right-pads a list of examples into
(input_ids, attention_mask, labels) with labels -100 on the prompt and the padding;
`masked_loss_sum` gives the summed cross-entropy over trained tokens and their count,
so callers can normalise by the number of supervised tokens of a whole batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IGNORE_INDEX = -100


class TokenSplit:
    def __init__(self, folder: str | Path, split: str):
        folder = Path(folder)
        self.meta = json.loads((folder / "meta.json").read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.index = np.load(folder / f"{split}_index.npy")
        n = int(self.index[:, 1].sum()) if len(self.index) else 0
        self.tokens = np.memmap(folder / f"{split}_tokens.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        self.mask = np.memmap(folder / f"{split}_mask.bin", dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, length = self.index[i]
        return np.asarray(self.tokens[start : start + length], dtype=np.int64), np.asarray(self.mask[start : start + length])


def collate(examples: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict:
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, mask) in enumerate(examples):
        n = len(ids)
        input_ids[i, :n] = torch.from_numpy(ids)
        attention[i, :n] = 1
        labels[i, :n] = torch.where(torch.from_numpy(mask.astype(bool)), torch.from_numpy(ids), IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def masked_loss_sum(model, batch: dict):
    """(sum of next-token cross-entropy over trained tokens, number of trained tokens)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())
