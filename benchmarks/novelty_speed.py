"""Novelty filter speed: stillhouse's exact index against the brute-force loops, same ordered data.

Candidates are built from every real instruction in ../shared/data (Alpaca, Alpaca-GPT4,
alpaca-libre, self-instruct, AlpacaEval, ShareGPT, Koala, Vicuna, MT-bench): each one is a random
real instruction with word-level edits (replace / delete / insert / swap) on a random share of its
words, so that some are near duplicates of each other and of the seeds, as in real generations.
The self-instruct seeds start the pool.

Baselines, timed on an evenly spaced sample of candidates against the pool as it stood at that
point (the pool is the one our run built, so the decisions can be compared) and extrapolated
to the whole run's pairs:
* `rouge_score`: Alpaca's loop, `rouge_scorer._score_lcs` over the pre-tokenized pool;
* `rapidfuzz`: the same loop with a C++ LCS over token ids (`process.cdist`, all cores).
Every sampled candidate's score and decision must equal ours.

    python -m benchmarks.novelty_speed --sizes 5000 52000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from pathlib import Path

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

from stages.lib.text.novelty import novelty, rouge_tokens


def _chars(ids: list[int]) -> str:
    """Token ids as a string, so rapidfuzz runs its bit-parallel LCS."""
    return "".join(chr(i if i < 0xD800 else i + 0x800) for i in ids)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def real_instructions(root: Path = SHARED) -> list[str]:
    """Every distinct instruction / prompt / question in the shared reference data."""
    texts: list[str] = []

    def jsonl(rel):
        return [json.loads(x) for x in (root / rel).read_text().splitlines() if x.strip()]

    def arr(rel):
        return json.loads((root / rel).read_text())

    for rel in ["alpaca/alpaca_data_first1727_flashmodels.json", "alpaca/alpaca_gpt4_en_demo_llamafactory.json",
                "alpaca_eval/text_davinci_003_outputs.json"]:
        texts += [r["instruction"] for r in arr(rel)]
    for rel in ["alpaca-libre/alpaca_libre_tasks_v1.jsonl", "self-instruct/user_oriented_instructions.jsonl"]:
        texts += [r["instruction"] for r in jsonl(rel)]
    texts += [r["conversations"][0]["value"] for r in arr("sharegpt/ShareGPT_V3_filtered_500.json")]
    texts += [r["prompt"] for r in jsonl("koala/koala_test_set.jsonl")]
    texts += [r["text"] for r in jsonl("fastchat/vicuna_eval_2023-03/question.jsonl")]
    texts += [t for r in jsonl("fastchat/mt_bench/question.jsonl") for t in r["turns"]]
    seen, out = set(), []
    for t in texts:
        t = " ".join(t.split()[:150])  # Alpaca drops > 150 words before the ROUGE filter
        if t and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def build_candidates(n: int, base: list[str], seed: int = 0) -> list[str]:
    """n candidates: real instructions with word-level edits on 0-80% of their words."""
    rng = random.Random(seed)
    vocab = sorted({w for t in base for w in t.split()})
    out = []
    for _ in range(n):
        words = rng.choice(base).split()
        for _ in range(round(rng.uniform(0, 0.8) * len(words))):
            op, i = rng.random(), rng.randrange(len(words))
            if op < 0.5:
                words[i] = rng.choice(vocab)
            elif op < 0.7 and len(words) > 1:
                del words[i]
            elif op < 0.9:
                words.insert(i, rng.choice(vocab))
            elif i + 1 < len(words):
                words[i], words[i + 1] = words[i + 1], words[i]
        out.append(" ".join(words))
    return out


def bench(n: int, seeds: list[str], base: list[str], threshold: float, sample: int) -> None:
    cands = build_candidates(n, base, seed=n)
    novelty(seeds[:2], cands[:2], threshold)  # compile (or load the cached machine code) first
    start = time.perf_counter()
    res = novelty(seeds, cands, threshold)
    secs = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kept = int(res.kept.sum())
    pool_size = len(seeds) + np.concatenate([[0], np.cumsum(res.kept)[:-1]])  # before each candidate
    pairs = int(pool_size.sum())
    print(f"\n{n} candidates, {len(seeds)} seeds: kept {kept}, rejected {n - kept} ({(n - kept) / n:.1%}); "
          f"{pairs:,} pairs in the brute-force loop")
    print(f"  stillhouse     {secs:8.2f} s   ({res.scored:,} exact LCS, {res.scored / pairs:.3%} of the pairs)")
    print(f"  peak RSS       {rss:8.0f} MiB (whole process, candidates and baselines' data included)")

    from rouge_score.rouge_scorer import _score_lcs

    texts = seeds + cands
    pool = list(range(len(seeds))) + [len(seeds) + i for i in np.flatnonzero(res.kept)]
    vocab: dict[str, int] = {}
    pool_tokens = [rouge_tokens(texts[j]) for j in pool]
    pool_ids = [_chars([vocab.setdefault(w, len(vocab)) for w in toks]) for toks in pool_tokens]
    picks = sorted({round(i * (n - 1) / max(1, sample - 1)) for i in range(sample)})
    rs_time = rf_time = sampled_pairs = 0.0
    for i in picks:
        toks, size = rouge_tokens(cands[i]), int(pool_size[i])
        t0 = time.perf_counter()
        scores = [_score_lcs(toks, p).fmeasure for p in pool_tokens[:size]]  # Alpaca's loop
        rs_time += time.perf_counter() - t0
        sampled_pairs += size
        best = max(scores, default=0.0)
        assert best == res.score[i] and (best <= threshold) == res.kept[i], (i, best, res.score[i])
        assert best == 0.0 or pool[scores.index(best)] == res.nearest[i], (i, scores.index(best), res.nearest[i])
        ids = _chars([vocab.setdefault(w, len(vocab)) for w in toks])
        t0 = time.perf_counter()
        process.cdist([ids], pool_ids[:size], scorer=LCSseq.similarity, workers=-1)
        rf_time += time.perf_counter() - t0
    rs_total, rf_total = rs_time / sampled_pairs * pairs, rf_time / sampled_pairs * pairs
    print(f"  rouge_score    {rs_total:8.0f} s   (Alpaca's loop, extrapolated from {len(picks)} candidates, "
          f"{sampled_pairs / rs_time:,.0f} pairs/s) -> {rs_total / secs:,.0f}x slower")
    print(f"  rapidfuzz LCS  {rf_total:8.1f} s   (brute force in C++ on token-id strings, all cores, extrapolated) "
          f"-> {rf_total / secs:,.1f}x slower")
    print(f"  scores, decisions and most similar instruction identical on all {len(picks)} sampled candidates")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 52000])
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--sample", type=int, default=40, help="candidates timed with the brute-force loops")
    args = ap.parse_args()
    seeds = [json.loads(x)["instruction"] for x in (SHARED / "self-instruct/seed_tasks.jsonl").read_text().splitlines()]
    base = real_instructions()
    print(f"{len(base)} distinct real instructions to build candidates from")
    for n in args.sizes:
        bench(n, seeds, base, args.threshold, args.sample)


if __name__ == "__main__":
    main()
