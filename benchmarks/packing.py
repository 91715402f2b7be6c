"""Padding efficiency and training speed: Alpaca's dynamic padding, length-grouped batches and packing.

Same token arrays, same model, same number of optimizer steps' worth of examples: each strategy
builds its batches from the training split and runs forward + backward on them. Padding
efficiency = real tokens / token slots (rows x width). Lengths come from `data/tokens` (run
`dvc repro tokenize` first) or from an Alpaca JSON file (`--alpaca`), or, with `--synthetic N`,
N uniform lengths (20-400).

    python -m benchmarks.packing --model models/teacher --steps 4 --batch-size 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def dynamic_batches(lengths, batch_size: int, seed: int = 0):
    order = np.random.default_rng(seed).permutation(len(lengths))
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def grouped_batches(lengths, batch_size: int, seed: int = 0):
    """HF `group_by_length`-style: sort by length inside mega-batches of 50 batches, then shuffle batches."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    mega = batch_size * 50
    out = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i : i + mega].tolist(), key=lambda j: -lengths[j])
        out += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def efficiency(lengths, batches) -> float:
    """Real tokens over slots when each batch is padded to its longest example."""
    real = sum(lengths[i] for b in batches for i in b)
    return real / sum(max(lengths[i] for i in b) * len(b) for b in batches)


def main() -> None:
    from stages.lib.training.batches import pack

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/tokens")
    ap.add_argument("--synthetic", type=int, default=0)
    ap.add_argument("--alpaca", default=None, help="an Alpaca JSON file: lengths of its examples, Alpaca template")
    ap.add_argument("--tokenizer", default="models/teacher")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--model", default=None, help="also time forward+backward with this model")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    if args.alpaca:
        import json

        from transformers import AutoTokenizer

        from stages.lib.tokens.templates import render_prompt

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        recs = json.load(open(args.alpaca, encoding="utf-8"))
        texts = [render_prompt(r["instruction"], r["input"], "alpaca") + r["output"] for r in recs]
        lengths = [min(args.width, len(x) + 1) for x in tok(texts)["input_ids"]]
        data = None
    elif args.synthetic:
        lengths = np.random.default_rng(0).integers(20, 400, args.synthetic).tolist()
        data = None
    else:
        from stages.lib.tokens.arrays import TokenSplit

        data = TokenSplit(args.data, "train")
        lengths = data.index[:, 1].tolist()
        args.width = int(data.meta.get("max_seq_len", args.width))
    rows = pack(lengths, args.width)
    print(f"{len(lengths)} examples, {sum(lengths):,} tokens, width {args.width}")
    effs = {"dynamic padding (Alpaca)": efficiency(lengths, dynamic_batches(lengths, args.batch_size)),
            "length-grouped": efficiency(lengths, grouped_batches(lengths, args.batch_size)),
            "packing": sum(lengths) / (args.width * len(rows))}
    for name, eff in effs.items():
        print(f"  {name:26s} padding efficiency {eff:6.1%}")
    if args.model and data is not None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from stages.lib.training.batches import collate, collate_packed, masked_loss_sum, pad_id

        tok = AutoTokenizer.from_pretrained(args.model)
        pad = pad_id(tok)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        rows_per_batch = max(1, round(args.batch_size * np.mean(lengths) / args.width))
        runs = {
            "dynamic padding (Alpaca)": [collate([data[i] for i in b], pad)
                                         for b in dynamic_batches(lengths, args.batch_size)],
            "length-grouped": [collate([data[i] for i in b], pad) for b in grouped_batches(lengths, args.batch_size)],
            "packing": [collate_packed([[data[i] for i in rows[r]]
                                        for r in range(k, min(k + rows_per_batch, len(rows)))],
                                       args.width, pad) for k in range(0, len(rows), rows_per_batch)],
        }
        for name, batches in runs.items():
            real = 0
            t0 = time.perf_counter()
            for b in batches[: args.steps]:
                loss, n = masked_loss_sum(model, b)
                (loss / max(1, n)).backward()
                real += int(b["attention_mask"].sum())
            dt = time.perf_counter() - t0
            print(f"  {name:26s} {real / dt:8.0f} real tokens/s over {min(args.steps, len(batches))} batches")


if __name__ == "__main__":
    main()
