"""The on-disk format of captured teacher log-probabilities, aligned to a split of the token arrays.

At every trained position of an example (position j with mask[j] = 1, j >= 1: the token the model predicts
from positions < j, exactly the targets `training.batches.targets_of` keeps, in the same order) the teacher's
k most likely next tokens, their log-probabilities at temperature 1, and the log of the mass outside them.

A folder (one split):
  `meta.json`   format, the split, its example count, the identity of the capture (teacher, tokenizer_id,
                k, template, codec: `identity`, its sha256 `identity_key`) and `shard_examples`
  `{split}-{start:08d}-{end:08d}.npz`, one per range of `shard_examples` examples, written atomically:
      offsets   int64 [n+1]   example e's rows are offsets[e]:offsets[e+1]
      ids       uint16 [rows, k] (uint32 when the vocabulary passes 65,536)
      logprobs  uint16 or float16 [rows, k], the codec's
      log_rest  the same codec [rows]
      identity  the capture's identity key; content: sha256 of the range's token ids and masks
A shard is reused only when both match, so a changed teacher, k, template, codec or example is recomputed.

Codecs: `uint16` maps [LOGPROB_FLOOR, 0] linearly onto 0..65535 (a uniform step of 6.1e-4 nats; lower
values, e^-40 of mass, become the floor); `float16` keeps the value to 11 significant bits. Both take
2 bytes, so a trained token costs 4k + 2 bytes plus 8 per example (k = 32: 130 bytes); docs/distillation.md
has the measured bytes and errors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.lib.errors import StageError
from stages.lib.io import atomic_file

FORMAT = "stillhouse-teacher-logprobs/1"
CODECS = ("uint16", "float16")
LOGPROB_FLOOR = -40.0
"""The lowest log-probability the uint16 codec keeps apart (e^-40: 4e-18 of mass)."""
_STEPS = 65535


@dataclass
class TeacherTopK:
    """The teacher at n trained positions, in the row-major order of a batch's targets (`training.loss.supervised`):
    `ids` [n, k] (long), `logprobs` [n, k] (float, temperature 1), `log_rest` [n] (log of the mass outside the
    k ids; -inf or very negative when there is none). torch tensors, as the KD losses take them."""

    ids: object
    logprobs: object
    log_rest: object

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device) -> TeacherTopK:
        return TeacherTopK(self.ids.to(device), self.logprobs.to(device), self.log_rest.to(device))


def stack_rows(rows: list) -> TeacherTopK:
    """Per-example (ids, logprobs, log_rest) rows, concatenated in order, as torch tensors."""
    import torch

    return TeacherTopK(*(torch.from_numpy(np.concatenate([np.asarray(r[j]) for r in rows])) for j in range(3)))


def encode(logp: np.ndarray, codec: str) -> np.ndarray:
    """Log-probabilities (<= 0, -inf allowed) in the codec's 2-byte form."""
    x = np.asarray(logp, dtype=np.float32)
    if codec == "float16":
        return np.minimum(x, 0.0).astype(np.float16)
    scaled = (np.clip(x, LOGPROB_FLOOR, 0.0) - LOGPROB_FLOOR) * (_STEPS / -LOGPROB_FLOOR)
    return np.rint(scaled).astype(np.uint16)


def decode(q: np.ndarray, codec: str) -> np.ndarray:
    """The float32 log-probabilities of an encoded array."""
    if codec == "float16":
        return np.asarray(q, dtype=np.float32)
    return (q.astype(np.float32) * (-LOGPROB_FLOOR / _STEPS) + LOGPROB_FLOOR).astype(np.float32)


def id_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def trained_positions(mask: np.ndarray) -> np.ndarray:
    """The positions j >= 1 with mask[j] = 1: where an example has a next-token target (`targets_of`'s)."""
    return np.flatnonzero(np.asarray(mask[1:], dtype=bool)) + 1


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def content_key(examples: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """sha256 over the token ids and masks of a range of examples."""
    h = hashlib.sha256()
    for ids, mask in examples:
        a, m = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)
        h.update(np.int64(len(a)).tobytes() + a.tobytes() + m.tobytes())
    return h.hexdigest()


def shard_name(split: str, start: int, end: int) -> str:
    return f"{split}-{start:08d}-{end:08d}.npz"


def ranges(n: int, per_shard: int) -> list[tuple[int, int]]:
    return [(s, min(s + per_shard, n)) for s in range(0, n, per_shard)]


def write_shard(path: Path, rows: list, codec: str, vocab_size: int, identity_key: str, content: str) -> int:
    """Write one shard of `rows` ((ids [p, k], logprobs [p, k], log_rest [p]) per example) atomically; its bytes."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r[0]) for r in rows])
    ids, lp, rest = (np.concatenate([np.asarray(r[i]) for r in rows]) for i in range(3))
    arrays = {"offsets": offsets, "ids": ids.astype(id_dtype(max(vocab_size, int(ids.max(initial=0)) + 1))),
              "logprobs": encode(lp, codec), "log_rest": encode(rest, codec),
              "identity": np.array(identity_key), "content": np.array(content)}
    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)
    return path.stat().st_size


def read_shard(path: Path) -> dict:
    """A shard's arrays; an unreadable one (cut short, not ours) is None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (OSError, ValueError, KeyError, EOFError):
        return None


def shard_matches(path: Path, identity_key: str, content: str) -> bool:
    """Is the shard at `path` this capture's (same identity) over these very examples (same content)?"""
    z = read_shard(path) if path.is_file() else None
    return z is not None and str(z.get("identity")) == identity_key and str(z.get("content")) == content


class CapturedSplit:
    """A captured folder read back against the split of token arrays it was captured from: `example(i)` is
    example i's (ids int64 [p, k], logprobs float32 [p, k], log_rest float32 [p]); `teacher(indices)` the rows of
    several examples, concatenated in that order, as a `TeacherTopK`. The folder must match the
    tokens (tokenizer, example count, each shard's token ids and masks), else StageError."""

    def __init__(self, folder: str | Path, tokens):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
        except (OSError, ValueError):
            raise StageError(f"{self.folder}: no readable meta.json (run the capture first)") from None
        ident, tok_meta = self.meta["identity"], tokens.meta
        if self.meta.get("format") != FORMAT:
            raise StageError(f"{self.folder}: format {self.meta.get('format')!r}, expected {FORMAT}")
        if ident["tokenizer_id"] != tok_meta.get("tokenizer_id") or self.meta["examples"] != len(tokens):
            raise StageError(f"{self.folder}: captured for {self.meta['examples']} examples with tokenizer "
                             f"{ident['tokenizer_id'][:12]}, the tokens have {len(tokens)} with "
                             f"{str(tok_meta.get('tokenizer_id'))[:12]}: capture again")
        self.tokens, self.codec = tokens, ident["codec"]
        self.per_shard = int(self.meta["shard_examples"])
        self._shards: dict[int, dict] = {}  # loaded on first use and kept: the whole artifact is small

    def _shard(self, s: int) -> dict:
        if s not in self._shards:
            start, end = s * self.per_shard, min((s + 1) * self.per_shard, len(self.tokens))
            z = read_shard(self.folder / shard_name(self.meta["split"], start, end))
            if z is None or str(z["identity"]) != self.meta["identity_key"]:
                raise StageError(f"{self.folder}: shard of examples {start}-{end} missing or not this capture's: "
                                 "capture again (it resumes)")
            if str(z["content"]) != content_key([self.tokens[i] for i in range(start, end)]):
                raise StageError(f"{self.folder}: examples {start}-{end} are not the ones captured (the tokens "
                                 "changed since): capture again (it rescores only what changed)")
            self._shards[s] = z
        return self._shards[s]

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z = self._shard(i // self.per_shard)
        e = i % self.per_shard
        a, b = int(z["offsets"][e]), int(z["offsets"][e + 1])
        want = len(trained_positions(self.tokens[i][1]))
        if b - a != want:
            raise StageError(f"{self.folder}: example {i} has {b - a} captured positions, its mask trains {want}")
        return (z["ids"][a:b].astype(np.int64), decode(z["logprobs"][a:b], self.codec),
                decode(z["log_rest"][a:b], self.codec))

    def teacher(self, indices):
        """The rows of examples `indices`, in that order (a batch's examples in row-major order)."""
        return stack_rows([self.example(i) for i in indices])
