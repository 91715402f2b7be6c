"""Instruction-following difficulty (Li et al. 2023, "From Quantity to Quality", arXiv 2308.12032; Cherry-LLM).

IFD = s(A|Q) / s(A): the student base model's mean cross-entropy on the response tokens given
the instruction (rendered with the student's training template, as tokenize renders it), over
its mean cross-entropy on the same response tokens alone (after BOS where the tokenizer adds
one). High IFD: the instruction helps little, so the example is hard; IFD >= 1 means the
instruction does not help at all (Cherry-LLM drops those). Both losses are returned, so
the columns can be checked or re-used. Batched, right-padded, no gradients.
"""

from __future__ import annotations

import numpy as np

from stages.lib.tokens.templates import encode_example
from stages.lib.training.batches import collate, pad_id, row_losses


def example_ids(instruction: str, input: str, output: str, template: str, tok, max_len: int):
    """(conditioned ids, number of prompt tokens, response-only ids, number of prefix tokens).

    The response ids are the same in both; both sequences are cut at `max_len` tokens with the
    prompt kept whole where possible (the response's tail is cut)."""
    prompt_ids, response_ids = encode_example(instruction, input, output, template, tok)
    prefix = tok("", add_special_tokens=True)["input_ids"]  # BOS where the tokenizer adds one
    if not prefix:  # a causal LM needs one token before the first predicted one
        prefix = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    cond = (prompt_ids + response_ids)[:max_len]
    alone = (prefix + response_ids)[: len(prefix) + max(0, len(cond) - len(prompt_ids))]
    return cond, len(prompt_ids), alone, len(prefix)


def response_losses(model, seqs: list[tuple[list[int], int]], pad: int, batch_size: int) -> list[float | None]:
    """Mean next-token cross-entropy over tokens from position `start` on, per (ids, start); None when
    there is no such token. Right-padded batches (training's `collate`: the padding is masked)."""
    import torch

    examples = [(np.asarray(ids, dtype=np.int64), (np.arange(len(ids)) >= start).astype(np.uint8))
                for ids, start in seqs]
    out: list[float | None] = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for b in range(0, len(examples), batch_size):
            batch = collate(examples[b : b + batch_size], pad)
            out += row_losses(model, {k: v.to(device) for k, v in batch.items()})
    return out


def ifd_scores(rows: list[dict], model, tok, template: str, max_len: int, batch_size: int):
    """[(ifd, loss given the instruction, loss of the response alone)] per row (None where no response
    token fits in `max_len`)."""
    cond, alone = [], []
    for r in rows:
        c, nc, a, na = example_ids(r["instruction"], r.get("input") or "", r["output"], template, tok, max_len)
        cond.append((c, nc))
        alone.append((a, na))
    lc = response_losses(model, cond, pad_id(tok), batch_size)
    la = response_losses(model, alone, pad_id(tok), batch_size)
    return [(c / a if c is not None and a else None, c, a) for c, a in zip(lc, la)]
