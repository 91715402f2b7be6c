"""Teacher generation throughput on this machine: batch size 1 (the baseline) against larger batches.

Uses the real generate prompts (seeds + `seeds/prompts/generate_prompt.txt`) and the materialised
teacher, forcing every sequence to produce exactly `--tokens` new tokens so that the
numbers compare. Run after `dvc repro teacher_model seeds`:

    python benchmarks/generate_throughput.py --batches 1 4 8 16 --tokens 64
"""

from __future__ import annotations

import argparse
import time

import torch

from stages.generate import GenerateParams
from stages.lib import paths
from stages.lib.generation.alpaca import build_prompts
from stages.lib.io import read_shards
from stages.lib.llm.local import load_model
from stages.lib.params import set_threads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/teacher")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    set_threads(args.threads)
    model, tok = load_model(args.model)
    seeds = read_shards(paths.SEEDS).to_dicts()
    p = GenerateParams()
    header = open(p.prompt_file, encoding="utf-8").read()
    prompts, _ = build_prompts(seeds, header, max(args.batches), p.num_prompt_instructions, p.seed,
                               p.teacher.prompt_form)
    print(f"threads={torch.get_num_threads()} new_tokens={args.tokens} model={args.model}")
    print(f"{'batch':>5} {'seconds':>8} {'tokens/s':>9} {'vs batch 1':>10}")
    base = None
    for b in args.batches:
        enc = tok(prompts[:b], return_tensors="pt", padding=True, add_special_tokens=False)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=True,
                           temperature=0.7, top_p=0.9, pad_token_id=tok.pad_token_id)
        dt = time.perf_counter() - t
        rate = b * args.tokens / dt
        base = base or rate
        print(f"{b:>5} {dt:>8.1f} {rate:>9.1f} {rate / base:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
