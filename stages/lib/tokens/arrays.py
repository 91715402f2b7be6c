"""The on-disk format of `data/tokens`: `tokenize` writes it, `train` and `evaluate` read it.

Per split (nanoGPT style, read with np.memmap):
  `{split}_tokens.bin`  all token ids, concatenated (uint16 when the vocab fits, else uint32)
  `{split}_mask.bin`    uint8, 1 where the token is trained (response tokens and EOS)
  `{split}_index.npy`   int64 [n, 2]: start offset and length of each example
  `{split}.parquet`     the example texts and rendered prompts (evaluate reads them)
and once, `meta.json`: the tokenizer's name and identity (`tokenizer_id`), vocabulary size, EOS
id, the token dtype, the template and `max_seq_len`.

`write_split` and `write_meta` write them, `TokenSplit` memory-maps one split back (its `meta`
is the folder's `meta.json`). Batching and the loss over these arrays are training's:
stages/lib/training/batches.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl

from stages.lib.io import atomic_file, write_json


class TokenSplit:
    """One split of a tokens folder: `index`, memory-mapped `tokens` and `mask`, and the folder's `meta`;
    `split[i]` is example i's (ids as int64, mask)."""

    def __init__(self, folder: str | Path, split: str):
        folder = Path(folder)
        self.meta = json.loads((folder / "meta.json").read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.index = np.load(folder / f"{split}_index.npy")
        n = int(self.index[:, 1].sum()) if len(self.index) else 0
        self.tokens = (np.memmap(folder / f"{split}_tokens.bin", dtype=dtype, mode="r", shape=(n,)) if n
                       else np.zeros(0, dtype))
        self.mask = (np.memmap(folder / f"{split}_mask.bin", dtype=np.uint8, mode="r", shape=(n,)) if n
                     else np.zeros(0, np.uint8))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, length = self.index[i]
        return (np.asarray(self.tokens[start : start + length], dtype=np.int64),
                np.asarray(self.mask[start : start + length]))


def tokenizer_id(tok) -> str:
    """Identity of a tokenizer: sha256 of its vocabulary and special tokens."""
    vocab = sorted(tok.get_vocab().items())
    special = [tok.eos_token, tok.bos_token, tok.pad_token]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def token_dtype(tok):
    """The narrowest token dtype for the tokenizer's vocabulary: uint16 when it fits, else uint32."""
    return np.uint16 if len(tok) <= 2**16 else np.uint32


def write_split(out: Path, split: str, encoded: list, dtype) -> dict:
    """`encoded`: (texts, ids, mask) per example."""
    lengths = [len(ids) for _, ids, _ in encoded]
    index = np.zeros((len(encoded), 2), dtype=np.int64)
    index[:, 1] = lengths
    index[1:, 0] = np.cumsum(lengths)[:-1]
    tokens = np.fromiter((t for _, ids, _ in encoded for t in ids), dtype=dtype, count=sum(lengths))
    mask = np.fromiter((m for _, _, ms in encoded for m in ms), dtype=np.uint8, count=sum(lengths))
    with atomic_file(out / f"{split}_tokens.bin", "wb") as f:
        f.write(tokens.tobytes())
    with atomic_file(out / f"{split}_mask.bin", "wb") as f:
        f.write(mask.tobytes())
    with atomic_file(out / f"{split}_index.npy", "wb") as f:
        np.save(f, index)
    schema = {"id": pl.String, "source": pl.String, "instruction": pl.String, "input": pl.String,
              "output": pl.String, "prompt": pl.String}
    texts = pl.DataFrame([t for t, _, _ in encoded], schema=schema)
    with atomic_file(out / f"{split}.parquet", "wb") as f:
        texts.write_parquet(f, compression="zstd")
    return {"examples": len(encoded), "tokens": int(sum(lengths)), "trained_tokens": int(mask.sum())}


def write_meta(out: Path, tok, tokenizer: str, dtype, template: str, max_seq_len: int) -> None:
    """`meta.json` of a tokens folder tokenized with `tok` (named `tokenizer`: a model dir or hub id)."""
    write_json(out / "meta.json", {
        "tokenizer": tokenizer, "tokenizer_id": tokenizer_id(tok), "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id, "dtype": np.dtype(dtype).name, "template": template,
        "max_seq_len": max_seq_len,
    })
