"""Packed rows without a mask on any device: SDPA run once per packed example (`sdpa_packed`).

A packed row holds several examples one after another, their position ids restarting at 0 at
each (`stages.lib.training.batches.pack`). Flash attention 2 reads those position ids as varlen
boundaries and builds no mask, but only on a CUDA GPU with `flash_attn` and 16-bit weights.
Everywhere else transformers' SDPA path turns the same position ids into a [rows, 1, L, L] mask,
memory quadratic in the row length, and attends over all L^2 pairs only to mask most of them.

`sdpa_packed` is registered with transformers' attention interface: its mask function returns no
mask at all, and its attention function cuts every row at the position-id restarts and runs
transformers' own `sdpa_attention_forward` causally on each example alone, so work and memory are
the sum of the examples' squared lengths, not L^2, and no example sees its neighbour. Without
position ids, with a padding mask, or for a single query (generation), it is plain SDPA.
Models whose mask is more than causal (sliding window, chunked or bidirectional attention) are
not eligible (`supports`), and keep the mask path.
"""

from __future__ import annotations

NAME = "sdpa_packed"


_last: tuple = (None, -1, None)
"""(weak reference to the position ids, their version, their spans): every layer of a forward gets the
same position-ids tensor, so its spans are read once (a device-to-host sync on a GPU), not per layer."""


def spans_of(position_ids) -> list[list[tuple[int, int]]]:
    """`segments(position_ids)`, computed once per position-ids tensor. The cache holds a weak reference:
    a new batch is a new tensor (never a hit, even at a reused address), an in-place change bumps its
    version."""
    import weakref

    global _last
    ref, version, spans = _last
    if ref is not None and ref() is position_ids and version == position_ids._version:
        return spans
    spans = segments(position_ids)
    _last = (weakref.ref(position_ids), position_ids._version, spans)
    return spans


def segments(position_ids) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans of its examples: a new one wherever the position id is 0."""
    import torch

    rows = []
    length = position_ids.shape[-1]
    for row in position_ids.reshape(-1, length):
        starts = torch.nonzero(row == 0).flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        rows.append(list(zip(starts, starts[1:] + [length])))
    return rows


def sdpa_packed_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: query [B, Hq, L, D], key/value [B, Hkv, L, D] -> ([B, L, Hq, D], None)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    kwargs.pop("is_causal", None)
    if position_ids is None or attention_mask is not None or query.shape[2] == 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    spans = spans_of(position_ids)
    if len(spans) == 1 < query.shape[0]:  # one row of position ids for the whole batch
        spans = spans * query.shape[0]
    out = []
    for b, row in enumerate(spans):  # a row of one example is one span over the whole row
        pieces = [sdpa_attention_forward(module, query[b : b + 1, :, s:e], key[b : b + 1, :, s:e],
                                         value[b : b + 1, :, s:e], None, dropout=dropout, scaling=scaling,
                                         is_causal=True, **kwargs)[0] for s, e in row]
        out.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return torch.cat(out, dim=0), None


def no_mask(*args, **kwargs):
    """The mask function: none is ever built (the attention function keeps examples apart)."""
    return None


def register() -> str:
    """Register `sdpa_packed` with transformers (idempotent); returns its name for `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_packed_forward)
    AttentionMaskInterface.register(NAME, no_mask)
    return NAME


def supports(config) -> bool:
    """Whether a model's attention is plain causal, so that per-example causal SDPA is all its mask would do."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "is_causal", True):
        return False
    if getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None):
        return False
    layer_types = getattr(text, "layer_types", None) or []
    return all(t == "full_attention" for t in layer_types)
