"""Packing memory: the dense 4-D block mask against restarting position ids, side by side.

A tiny model of Llama's architecture with Llama-3's 128K vocabulary, one packed batch of
4 x 2,048 tokens (examples of 32..512 tokens, best-fit packed), forward + backward, each arm in a
fresh process, three paths: the dense mask; position ids under transformers' SDPA (which
builds a [rows, 1, L, L] mask from them on the CPU); position ids under `sdpa_packed` (SDPA once
per example, no mask: stages/lib/training/attention.py, what `train` picks for packed rows on
SDPA). Reported: peak RSS above the process's baseline (taken after the model is built, before the
batch is collated, so the dense mask's own tensors count) and the median step time. Both arms use
the chunked loss (256 tokens' logits at a time) so the attention path is what differs; the
losses must agree to 1e-5. (Flex attention has no backward on the CPU in
torch 2.13, so it is covered by the forward-only test on the CPU and left to the GPU check.)

    python -m benchmarks.packing_memory                  # the table for docs/scaling.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from benchmarks.memory_util import rss_mb, run_arm, tiny_llama

ARMS = {"dense": "dense 4-D float mask (fallback), SDPA",
        "position_ids": "position ids, transformers' SDPA (mask built from them)",
        "sdpa_packed": "position ids, sdpa_packed (SDPA per example, no mask)"}


def batch_rows(n_rows: int, width: int, vocab: int, seed: int = 0):
    from stages.lib.training.batches import pack

    rng = np.random.default_rng(seed)
    examples, total = [], 0
    while total < n_rows * width * 0.97:
        n = int(rng.integers(32, 513))
        ids = rng.integers(0, vocab, size=n)
        mask = np.r_[np.zeros(n // 2, np.uint8), np.ones(n - n // 2, np.uint8)]
        examples.append((ids, mask))
        total += n
    rows = pack([len(e[0]) for e in examples], width)[:n_rows]
    return [[examples[i] for i in r] for r in rows]


def arm(a) -> dict:
    import torch

    from stages.lib.training.batches import collate_packed, masked_loss_sum

    torch.manual_seed(0)
    model = tiny_llama(a.vocab, a.hidden, a.layers)
    if a.arm == "sdpa_packed":
        from stages.lib.training.attention import register

        model.set_attn_implementation(register())
    rows = batch_rows(a.rows, a.width, a.vocab)
    before = rss_mb()
    times, loss = [], None
    for _ in range(a.steps):
        t0 = time.perf_counter()
        batch = collate_packed(rows, a.width, 0, dense_mask=a.arm == "dense")
        model.zero_grad(set_to_none=True)
        s, n = masked_loss_sum(model, batch, a.loss_chunk)
        s.backward()
        times.append(time.perf_counter() - t0)
        loss = s.item() / n
    return {"arm": a.arm, "peak_mb": round(rss_mb() - before, 1), "step_s": round(statistics.median(times), 3),
            "loss": loss, "tokens": int(batch["attention_mask"].sum())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--loss-chunk", type=int, default=256)
    ap.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.arm:
        print(json.dumps(arm(a)))
        return
    common = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k != "arm"]
    res = {x: run_arm("benchmarks.packing_memory", common + [f"--arm={x}"]) for x in ARMS}
    d, p = res["dense"], res["sdpa_packed"]
    print(f"packed batch {a.rows} x {a.width} ({d['tokens']} tokens), vocab {a.vocab}, hidden {a.hidden}, "
          f"{a.layers} layers")
    print("| path | peak RSS above baseline (MiB) | step time (s) | loss |")
    print("|---|---|---|---|")
    for k, r in res.items():
        print(f"| {ARMS[k]} | {r['peak_mb']} | {r['step_s']} | {r['loss']:.6f} |")
    same = all(abs(r["loss"] - d["loss"]) <= 1e-5 * abs(d["loss"]) for r in res.values())
    print(f"dense / sdpa_packed: memory {d['peak_mb'] / max(p['peak_mb'], 1e-9):.2f}x, "
          f"time {d['step_s'] / p['step_s']:.2f}x; losses equal to 1e-5: {same}")


if __name__ == "__main__":
    main()
