"""Check the novelty filter on your own data (the command-line contract of issue 4).

    python -m benchmarks.novelty --seeds SEEDS.jsonl --candidates CANDIDATES.jsonl \
        --out DECISIONS.jsonl [--threshold 0.7] [--tokenizer rouge_score|unicode]

Both inputs are JSONL with an `instruction` field; candidates are taken in file order. Each
output line: `index`, `kept` (bool), `score` (max ROUGE-L F1 against the seeds and the earlier
kept candidates) and `most_similar` (that instruction's text; null when nothing shares a token).
The last line printed is the elapsed seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from stages.lib.text.novelty import TOKENIZERS, novelty_decisions


def read_instructions(path: Path) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{line_no}: invalid JSON: {e.msg}")
            if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str):
                sys.exit(f"{path}:{line_no}: instruction: missing or not a string")
            out.append(rec["instruction"])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=Path, required=True)
    ap.add_argument("--candidates", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--tokenizer", choices=TOKENIZERS, default="rouge_score")
    args = ap.parse_args(argv)
    seeds, candidates = read_instructions(args.seeds), read_instructions(args.candidates)
    start = time.perf_counter()
    decisions = list(novelty_decisions(seeds, candidates, args.threshold, args.tokenizer))
    elapsed = time.perf_counter() - start
    tmp = args.out.with_name(args.out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, (kept, score, similar) in enumerate(decisions):
            f.write(json.dumps({"index": i, "kept": kept, "score": score, "most_similar": similar}) + "\n")
    tmp.replace(args.out)
    kept = sum(k for k, _, _ in decisions)
    print(f"{len(candidates)} candidates against {len(seeds)} seeds: kept {kept}, rejected {len(candidates) - kept}")
    print(f"{elapsed:.3f}")


if __name__ == "__main__":
    main()
