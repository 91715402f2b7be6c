"""Chunked cross-entropy: the loss of a causal LM without its full-vocabulary logits in memory.

The plain loss materialises logits for every position ([tokens, vocab], upcast to float32 and
kept for backward): at Llama-3's 128K vocabulary that is the largest tensor of a step. Here the
model's output layer is asked for the loss instead of the logits (`loss_from_head`): its forward
receives the final hidden states, keeps the supervised positions only, and computes
cross-entropy `chunk` tokens at a time under activation checkpointing, so one chunk's logits
exist at a time, in forward and (recomputed) in backward. Same sum, same gradients as the plain
loss, to float rounding.
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


def chunked_cross_entropy_sum(hidden, head, targets, chunk: int):
    """sum of cross-entropy(head(hidden[i]), targets[i]) over positions with a target; `hidden`
    [..., H] and `targets` [...] aligned, float32 loss, `chunk` positions' logits at a time."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1)
    keep = (t != IGNORE_INDEX).nonzero().squeeze(-1)
    h, t = h.index_select(0, keep), t.index_select(0, keep)
    project = type(head).forward  # the class's forward: `head.forward` may be patched by loss_from_head

    def piece(hc, tc):
        return F.cross_entropy(project(head, hc).float(), tc, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, t.numel(), chunk):
        total = total + checkpoint(piece, h[i : i + chunk], t[i : i + chunk], use_reentrant=False)
    return total


@contextlib.contextmanager
def loss_from_head(model, targets, chunk: int):
    """Within the block, `model(...).logits` is the summed next-token cross-entropy against `targets`
    ([batch, seq-1], `IGNORE_INDEX` ignored): the output head's forward is swapped for the chunked loss. It
    still runs inside the model's forward, so FSDP and DDP hooks see the head's weights as usual."""
    head = output_head(model)
    head.forward = lambda hidden: chunked_cross_entropy_sum(hidden[:, :-1], head, targets, chunk)
    try:
        yield
    finally:
        del head.forward
