"""Batches of token arrays and their masked next-token loss: what train, evaluate and IFD feed the model.

`collate` right-pads a list of examples ((ids, mask) as `TokenSplit` gives them) into
(input_ids, attention_mask, labels) with labels `IGNORE_INDEX` on the prompt and the padding;
`pack` bin-packs examples into fixed-width rows and `collate_packed` builds such rows with
position ids that restart for each example, so packed examples never attend to each other:
transformers reads restarting position ids as packed sequences when no attention mask is given
(flash-attention-2 varlen, SDPA and flex attention build no dense float mask), and a dense
block-diagonal mask is the fallback for models that do not (`dense_mask=True`);
`masked_loss_sum` gives the summed cross-entropy over trained tokens and their count (plain,
or chunked so the full-vocabulary logits never exist: stages/lib/training/loss.py), so callers
can normalise by the number of supervised tokens of a whole batch; `row_losses` gives the mean
per row (IFD); `validation_loss` is the mean over a split (train's `val_loss` and evaluate's).
"""

from __future__ import annotations

import bisect
import contextlib

import numpy as np

from stages.lib.progress import progress
from stages.lib.training.loss import IGNORE_INDEX, loss_from_head


def pad_id(tok) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (padding is never trained
    on nor attended to, so any id works; a pad id of 0 is a pad id)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def labels_of(ids, mask):
    """The example's ids where its mask is 1 (trained), `IGNORE_INDEX` elsewhere."""
    import torch

    return torch.where(torch.from_numpy(mask.astype(bool)), torch.from_numpy(ids), IGNORE_INDEX)


def collate(examples: list[tuple[np.ndarray, np.ndarray]], pad: int) -> dict:
    """Right-padded (input_ids, attention_mask, labels) of examples, as wide as the longest."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, mask) in enumerate(examples):
        n = len(ids)
        input_ids[i, :n] = torch.from_numpy(ids)
        attention[i, :n] = 1
        labels[i, :n] = labels_of(ids, mask)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pack(lengths, width: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into rows of `width` tokens.

    Deterministic (ties by index); an example longer than `width` gets a row of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free slots, row), sorted
    for i in order:
        n = int(lengths[i])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
            rows[r].append(i)
            if room - n > 0:
                bisect.insort(free, (room - n, r))
        else:
            rows.append([i])
            if width - n > 0:
                bisect.insort(free, (width - n, len(rows) - 1))
    return rows


def collate_packed(rows: list[list[tuple[np.ndarray, np.ndarray]]], width: int, pad: int,
                   dense_mask: bool = False) -> dict:
    """Packed rows: input_ids, labels, position_ids (restarting per example, and for the padding at
    the end of a row, which is one more sequence) and attention_mask (1 on real tokens, for
    counting only). `dense_mask`: also `block` (bool [rows, 1, width, width]: causal within an
    example, nothing across examples; a padding position sees only itself), the fallback for
    models that do not read packed position ids."""
    import torch

    width = max(width, max(sum(len(ids) for ids, _ in row) for row in rows))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    if dense_mask:
        block = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1, 1)
        causal = torch.ones((width, width), dtype=torch.bool).tril()
    for r, row in enumerate(rows):
        pos = 0
        for ids, mask in row:
            n = len(ids)
            input_ids[r, pos : pos + n] = torch.from_numpy(ids)
            labels[r, pos : pos + n] = labels_of(ids, mask)
            position_ids[r, pos : pos + n] = torch.arange(n)
            attention[r, pos : pos + n] = 1
            if dense_mask:
                block[r, 0, pos : pos + n, pos : pos + n] = causal[:n, :n]
            pos += n
        position_ids[r, pos:] = torch.arange(width - pos)
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention}
    if dense_mask:
        out["block"] = block
    return out


def targets_of(batch: dict):
    """Next-token targets: labels shifted left; in a packed row the target at an example boundary
    (the next example's first token) is ignored."""
    targets = batch["labels"][:, 1:]
    if "position_ids" in batch:
        targets = targets.masked_fill(batch["position_ids"][:, 1:] == 0, IGNORE_INDEX)
    return targets


def model_inputs(model, batch: dict) -> dict:
    """The forward's arguments for a batch. A packed batch runs with its restarted position ids and no
    attention mask (transformers masks each packed example off from the others), or with its dense
    block-diagonal mask when it has one (`block`); a padded batch with its attention mask."""
    import torch

    if "block" in batch:
        dtype = next(model.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        bias = torch.zeros(batch["block"].shape, dtype=dtype, device=batch["block"].device)
        bias = bias.masked_fill(~batch["block"], torch.finfo(dtype).min)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": bias, "position_ids": batch["position_ids"]}
    elif "position_ids" in batch:
        # no mask and no KV cache: transformers then reads restarting position ids as packed sequences
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs["use_cache"] = False
    return inputs


def masked_loss_sum(model, batch: dict, loss_chunk: int = 0):
    """(sum of next-token cross-entropy over trained tokens, number of trained tokens).
    `loss_chunk` > 0: chunked cross-entropy, that many tokens' logits at a time (under
    `loss_from_head` the model's `logits` output is that sum)."""
    import torch.nn.functional as F

    inputs = model_inputs(model, batch)
    targets = targets_of(batch)
    n = int((targets != IGNORE_INDEX).sum())
    if loss_chunk:
        with loss_from_head(model, targets, loss_chunk):
            return model(**inputs).logits, n
    logits = model(**inputs).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


def row_losses(model, batch: dict) -> list[float | None]:
    """Mean next-token cross-entropy over each row's trained tokens (None for a row with none)."""
    import torch.nn.functional as F

    logits = model(**model_inputs(model, batch)).logits.float()
    targets = targets_of(batch)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    n = (targets != IGNORE_INDEX).sum(1)
    return [s / c if c else None for s, c in zip(nll.sum(1).tolist(), n.tolist())]


def validation_loss(model, data, batch_size: int, pad: int, device=None, autocast=None,
                    desc: str | None = None, loss_chunk: int = 0) -> tuple[float | None, int]:
    """Mean next-token cross-entropy per supervised token over a split (a `TokenSplit`; None when it
    has no supervised token), and that token count. Dropout is off during the loop (the model's mode
    is restored after) and no random state is drawn, so a training run is the same with or without
    it. `device`: where batches go (default: the model's); `autocast`: a context factory
    (accelerate's `acc.autocast`); `desc`: report progress under this name; `loss_chunk`: as
    `masked_loss_sum`'s (0: plain). Under FSDP every process must call it."""
    import torch

    device = device if device is not None else next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(data), batch_size)
    with torch.no_grad():
        for i in progress(starts, len(starts), desc) if desc else starts:
            b = collate([data[j] for j in range(i, min(i + batch_size, len(data)))], pad)
            with autocast():
                s, n = masked_loss_sum(model, {k: v.to(device) for k, v in b.items()}, loss_chunk)
            total, count = total + s.item(), count + n
    model.train(was_training)
    return (total / count if count else None), count
