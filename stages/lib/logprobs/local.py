"""The local teacher as a source of captured log-probabilities: batched forward passes over token-array examples.

`score_rows` runs the teacher's decoder over a padded batch, keeps the hidden states of the trained
positions only (`training.loss.supervised`, the order the KD loss reads them in) and applies the output head
`chunk` positions at a time, so the full-vocabulary logits of a whole batch never exist; at each position it
keeps the top k log-probabilities and the log of the rest (`topk_rows`). `LocalTeacher` is the source
`capture` drives: its identity is the weights' hash (`llm.local.fingerprint`), its tokenizer is read before
any weight is loaded, so a teacher with another vocabulary is refused without compute.
"""

from __future__ import annotations

import numpy as np

from stages.lib.llm.local import fingerprint, pick_device
from stages.lib.tokens.arrays import tokenizer_id
from stages.lib.training.batches import collate, pad_id, targets_of
from stages.lib.training.loss import IGNORE_INDEX, head_logits, output_head, supervised


def topk_rows(logits, k: int):
    """(ids int64 [n, k], logprobs float32 [n, k], log_rest float32 [n]) of logits [n, V]: the k most likely ids
    (most likely first), their log-probabilities and the log of the mass of every other id (-inf if none)."""
    lp = logits.float().log_softmax(-1)
    top = lp.topk(k, -1)
    rest = lp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    return top.indices.cpu().numpy(), top.values.cpu().numpy(), rest.cpu().numpy()


def score_rows(model, examples: list, k: int, pad: int, batch_size: int = 8, chunk: int = 1024,
               on_done=None) -> list:
    """The teacher's top-k rows of every example ((ids, mask) pairs): per example (ids [p, k], logprobs [p, k],
    log_rest [p]) at its p trained positions, in order; `on_done(index, rows)` is called as each batch ends."""
    import torch

    head, decoder = output_head(model), model.get_decoder()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        batch = {n: x.to(device) for n, x in collate(examples[i : i + batch_size], pad).items()}
        targets = targets_of(batch)
        with torch.no_grad():
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).last_hidden_state
            h, _ = supervised(hidden[:, :-1], targets)
            parts = [topk_rows(head_logits(head, h[j : j + chunk]), k) for j in range(0, len(h), chunk)]
        ids, lp, rest = (np.concatenate([p[n] for p in parts]) if parts else None for n in range(3))
        at = 0
        for count in (targets != IGNORE_INDEX).sum(1).tolist():
            if ids is None:
                out.append((np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.float32)))
            else:
                out.append((ids[at : at + count], lp[at : at + count], rest[at : at + count]))
            at += count
            if on_done is not None:
                on_done(len(out) - 1, out[-1])
    return out


class LocalTeacher:
    """A model dir (or hub id) on this machine, scored in batches of `batch_size`, `chunk` positions of logits at a
    time. The weights are loaded on the first `topk` (the tokenizer at once, for the identity checks)."""

    def __init__(self, model: str, batch_size: int = 8, chunk: int = 1024, dtype: str = "float32",
                 device: str = "auto"):
        from transformers import AutoConfig, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        vocab = max(len(tok), int(getattr(AutoConfig.from_pretrained(model), "vocab_size", 0) or 0))  # rows may pad
        self.name, self.tokenizer_id, self.pad, self.vocab_size = model, tokenizer_id(tok), pad_id(tok), vocab
        self.teacher_id = f"local:{fingerprint(model)}"
        self.batch_size, self.chunk, self.dtype, self.device = batch_size, chunk, dtype, device
        self._model = None
        self.forward_passes = 0  # batches run (what a resumed or refused capture must not redo)

    def model(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM

            self._model = AutoModelForCausalLM.from_pretrained(self.name, dtype=getattr(torch, self.dtype))
            self._model.to(pick_device(self.device)).eval()
        return self._model

    def topk(self, examples: list, k: int, on_done=None) -> list:
        self.forward_passes += -(-len(examples) // self.batch_size)
        return score_rows(self.model(), examples, k, self.pad, self.batch_size, self.chunk, on_done)
