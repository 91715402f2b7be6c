"""Chunked cross-entropy: the loss of a causal LM without its full-vocabulary logits in memory.

The plain loss materialises logits for every position ([tokens, vocab], upcast to float32 and
kept for backward): at Llama-3's 128K vocabulary that is the largest tensor of a step. Here the
model's output layer is asked for the loss instead of the logits (`loss_from_head`): its forward
receives the final hidden states, keeps the supervised positions only, and computes
cross-entropy `chunk` tokens at a time under activation checkpointing, so one chunk's logits
exist at a time, in forward and (recomputed) in backward. Same sum, same gradients as the plain
loss, to float rounding.

The pieces are shared with the distillation losses (stages/lib/training/kd.py): `supervised` picks the
trained positions, `chunked_sum` runs a loss chunk by chunk, `head_computes` swaps the head's forward.
"""

from __future__ import annotations

import contextlib

IGNORE_INDEX = -100
"""The label of a position that is not trained on (the prompt, the padding): the one definition."""


def output_head(model):
    """The output projection (`lm_head`) of a transformers causal LM, through peft / DDP / FSDP wrappers."""
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel) and m.get_output_embeddings() is not None:
            if getattr(m.config, "final_logit_softcapping", None) or getattr(m.config, "logit_scale", None):
                raise ValueError(f"{type(m).__name__} post-processes its logits: chunked cross-entropy would skip that")
            return m.get_output_embeddings()
    raise ValueError(f"{type(model).__name__}: no output embeddings found for the chunked loss")


def supervised(hidden, targets):
    """(hidden states [n, H], targets [n]) at the positions with a target, in row-major order: the rows a
    chunked loss runs over, and the order captured teacher log-probabilities are stored in."""
    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1)
    keep = (t != IGNORE_INDEX).nonzero().squeeze(-1)
    return h.index_select(0, keep), t.index_select(0, keep)


def head_logits(head, hidden):
    """The output head's logits of `hidden`, through the head's class forward (`head.forward` may be patched
    by `head_computes`)."""
    return type(head).forward(head, hidden)


def chunked_sum(piece, n: int, chunk: int, *rows):
    """sum over chunks of `piece(*row slices)`, each chunk under activation checkpointing, so only one chunk's
    logits exist at a time, in forward and (recomputed) in backward; `rows`: tensors of n rows, sliced alike.
    `piece` returns a tensor of one fixed shape (a scalar, or several sums side by side). None when n is 0."""
    from torch.utils.checkpoint import checkpoint

    total = None
    for i in range(0, n, chunk):
        part = checkpoint(piece, *(r[i : i + chunk] for r in rows), use_reentrant=False)
        total = part if total is None else total + part
    return total


def chunked_cross_entropy_sum(hidden, head, targets, chunk: int):
    """sum of cross-entropy(head(hidden[i]), targets[i]) over positions with a target; `hidden`
    [..., H] and `targets` [...] aligned, float32 loss, `chunk` positions' logits at a time."""
    import torch
    import torch.nn.functional as F

    h, t = supervised(hidden, targets)

    def piece(hc, tc):
        return F.cross_entropy(head_logits(head, hc).float(), tc, reduction="sum")

    total = chunked_sum(piece, t.numel(), chunk, h, t)
    return hidden.new_zeros((), dtype=torch.float32) if total is None else total


@contextlib.contextmanager
def head_computes(model, fn):
    """Within the block, `model(...).logits` is `fn(hidden[:, :-1], head)`: the output head's forward is swapped
    for `fn` (a loss over the final hidden states). It still runs inside the model's forward, so FSDP and DDP
    hooks see the head's weights as usual."""
    head = output_head(model)
    head.forward = lambda hidden: fn(hidden[:, :-1], head)
    try:
        yield
    finally:
        del head.forward


def loss_from_head(model, targets, chunk: int):
    """Within the block, `model(...).logits` is the summed next-token cross-entropy against `targets`
    ([batch, seq-1], `IGNORE_INDEX` ignored), chunked (`head_computes`)."""
    return head_computes(model, lambda hidden, head: chunked_cross_entropy_sum(hidden, head, targets, chunk))
