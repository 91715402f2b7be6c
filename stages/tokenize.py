"""Stage `tokenize`: render kept tasks with the student template, tokenize, mask, split.

Output per split (nanoGPT style, read with np.memmap):
  `{split}_tokens.bin`  all token ids, concatenated (uint16 when the vocab fits, else uint32)
  `{split}_mask.bin`    uint8, 1 where the token is trained (response tokens and EOS)
  `{split}_index.npy`   int64 [n, 2]: start offset and length of each example
  `{split}.parquet`     the example texts and rendered prompts (evaluate reads them)
  `meta.json`           tokenizer identity, dtype, template, max_seq_len
The train/validation split hashes each example's instruction and input, so an example
stays in its split when others are added or removed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from stages.common import StageError, atomic_dir, atomic_file, check, load_params, log, read_shards, run_main, write_json
from stages.templates import TEMPLATES, encode_example, render_prompt


@dataclass
class TokenizeParams:
    tokenizer: str = "models/teacher"
    """Student tokenizer (a model dir or hub id); must match `train.base_model`."""
    template: str = "alpaca"
    """Prompt template: `alpaca` (with-input / no-input) or `chat` (the student's chat template)."""
    max_seq_len: int = 512
    """Longer examples lose the end of their response (counted as truncations)."""
    val_fraction: float = 0.1
    """Share of examples held out for validation (at least one when there are two or more)."""
    split_seed: int = 0
    """Salt of the split hash."""
    out_dir: str = "data/tokens"
    """Output folder."""

    def __post_init__(self):
        check(self.template in TEMPLATES, f"template: expected one of {TEMPLATES}, got {self.template!r}")
        check(self.max_seq_len >= 16, "max_seq_len: must be >= 16")
        check(0 <= self.val_fraction < 1, "val_fraction: must be in [0, 1)")


def tokenizer_id(tok) -> str:
    """Identity of a tokenizer: sha256 of its vocabulary and special tokens."""
    vocab = sorted(tok.get_vocab().items())
    special = [tok.eos_token, tok.bos_token, tok.pad_token]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def split_of(instruction: str, input: str, val_fraction: float, salt: int) -> float:
    """A uniform number in [0, 1) from the example's text: < val_fraction means validation."""
    h = hashlib.sha256(f"{salt}\x00{instruction}\x00{input}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_splits(rows: list[dict], val_fraction: float, salt: int) -> list[str]:
    u = [split_of(r["instruction"], r["input"], val_fraction, salt) for r in rows]
    splits = ["val" if x < val_fraction else "train" for x in u]
    if val_fraction > 0 and len(rows) >= 2 and "val" not in splits:
        splits[int(np.argmin(u))] = "val"
    return splits


def encode_rows(rows: list[dict], tok, template: str, max_seq_len: int):
    """Yield (row, ids, mask, truncated) for every example; raises if a prompt alone is too long."""
    for r in rows:
        prompt, response = encode_example(r["instruction"], r["input"], r["output"], template, tok)
        if len(prompt) >= max_seq_len:
            yield r, None, None, "prompt_too_long"
            continue
        ids = (prompt + response)[:max_seq_len]
        mask = ([0] * len(prompt) + [1] * len(response))[:max_seq_len]
        yield r, ids, mask, "truncated" if len(prompt) + len(response) > max_seq_len else None


def write_split(out: Path, split: str, encoded: list, dtype, template: str, tok) -> dict:
    lengths = [len(ids) for _, ids, _, _ in encoded]
    index = np.zeros((len(encoded), 2), dtype=np.int64)
    index[:, 1] = lengths
    index[1:, 0] = np.cumsum(lengths)[:-1]
    tokens = np.fromiter((t for _, ids, _, _ in encoded for t in ids), dtype=dtype, count=sum(lengths))
    mask = np.fromiter((m for _, _, ms, _ in encoded for m in ms), dtype=np.uint8, count=sum(lengths))
    with atomic_file(out / f"{split}_tokens.bin", "wb") as f:
        f.write(tokens.tobytes())
    with atomic_file(out / f"{split}_mask.bin", "wb") as f:
        f.write(mask.tobytes())
    with atomic_file(out / f"{split}_index.npy", "wb") as f:
        np.save(f, index)
    texts = pl.DataFrame(
        {
            "instruction": [r["instruction"] for r, *_ in encoded],
            "input": [r["input"] for r, *_ in encoded],
            "output": [r["output"] for r, *_ in encoded],
            "prompt": [render_prompt(r["instruction"], r["input"], template, tok) for r, *_ in encoded],
        },
        schema={"instruction": pl.String, "input": pl.String, "output": pl.String, "prompt": pl.String},
    )
    with atomic_file(out / f"{split}.parquet", "wb") as f:
        texts.write_parquet(f, compression="zstd")
    return {"examples": len(encoded), "tokens": int(sum(lengths)), "trained_tokens": int(mask.sum())}


def main() -> None:
    from transformers import AutoTokenizer

    p = load_params(TokenizeParams, "tokenize")
    tok = AutoTokenizer.from_pretrained(p.tokenizer)
    if tok.eos_token_id is None:
        raise StageError(f"{p.tokenizer}: tokenizer has no EOS token")
    rows = read_shards("data/filtered", "kept").sort(["request_index", "item_index"]).to_dicts()
    splits = assign_splits(rows, p.val_fraction, p.split_seed)
    dtype = np.uint16 if len(tok) <= 2**16 else np.uint32
    encoded = list(encode_rows(rows, tok, p.template, p.max_seq_len))
    stats = {"examples_in": len(rows), "prompt_too_long": 0, "truncated": 0}
    by_split: dict[str, list] = {"train": [], "val": []}
    for split, e in zip(splits, encoded):
        if e[3]:
            stats[e[3]] += 1
        if e[1] is not None:
            by_split[split].append(e)
    with atomic_dir(p.out_dir) as out:
        for split, enc in by_split.items():
            stats[split] = write_split(out, split, enc, dtype, p.template, tok)
        write_json(out / "meta.json", {
            "tokenizer": p.tokenizer, "tokenizer_id": tokenizer_id(tok), "vocab_size": len(tok),
            "eos_token_id": tok.eos_token_id, "dtype": np.dtype(dtype).name, "template": p.template,
            "max_seq_len": p.max_seq_len,
        })
    write_json("metrics/tokenize.json", stats)
    log(f"tokenize: {stats['train']['examples']} train / {stats['val']['examples']} val examples, "
        f"{stats['train']['tokens'] + stats['val']['tokens']} tokens, {stats['truncated']} truncated, "
        f"{stats['prompt_too_long']} dropped (prompt too long)")


if __name__ == "__main__":
    run_main(main)
