"""Stage `filter`: Alpaca/self-instruct rule filters, ROUGE-L novelty, MinHash-LSH near duplicates.

Steps, in order, each a pure function over rows in generation order:
1. rules: instruction word count, blacklist words, "Write a program", punctuation or
   non-ASCII first character, empty output, input equal to output;
2. novelty: reject when ROUGE-L F1 (rouge_score's tokenization: lowercase `[a-z0-9]+`,
   no stemming) against the seeds or any earlier kept instruction is > threshold;
3. near duplicates: MinHash LSH (datasketch) over the whole example (instruction, input
   and output), against earlier kept examples.
Kept and rejected rows (with reason and detail) go to separate parquet outputs; counts
per reason go to `metrics/filter.json`.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import polars as pl
from rapidfuzz.distance import LCSseq

from stages.common import atomic_dir, check, load_params, log, progress, read_shards, run_main, write_json, write_shards

BLACKLIST = [
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
]


@dataclass
class FilterParams:
    min_words: int = 4
    """Reject instructions with fewer words (Alpaca drops <= 3)."""
    max_words: int = 150
    """Reject instructions with more words (Alpaca: > 150)."""
    blacklist: list[str] = field(default_factory=lambda: list(BLACKLIST))
    """Whole words (case-insensitive) that mark tasks a text-only model cannot do."""
    rouge_threshold: float = 0.7
    """Reject when ROUGE-L F1 with the seeds or an earlier kept instruction is above this."""
    minhash_threshold: float = 0.8
    """Estimated Jaccard similarity of whole examples above which a later one is a near duplicate."""
    minhash_num_perm: int = 128
    """MinHash permutations (more: better estimates, slower)."""
    minhash_ngram: int = 3
    """Word n-gram shingles for MinHash."""
    out_dir: str = "data/filtered"
    """Output folder: `kept-*.parquet`, `rejected-*.parquet`."""
    rows_per_shard: int = 50_000
    """Rows per parquet shard."""

    def __post_init__(self):
        check(1 <= self.min_words <= self.max_words, "need 1 <= min_words <= max_words")
        check(0 < self.rouge_threshold <= 1, "rouge_threshold: must be in (0, 1]")
        check(0 < self.minhash_threshold <= 1, "minhash_threshold: must be in (0, 1]")
        check(self.minhash_num_perm >= 16 and self.minhash_ngram >= 1, "minhash_num_perm >= 16 and minhash_ngram >= 1")


# ---------------------------------------------------------------- rules


def rule_reason(row: dict, p: FilterParams, blacklist_re: re.Pattern | None) -> str | None:
    """The first rule a row breaks, or None."""
    inst = row["instruction"] or ""
    n = len(inst.split())
    if n < p.min_words:
        return "too_short"
    if n > p.max_words:
        return "too_long"
    if blacklist_re is not None and blacklist_re.search(inst):
        return "blacklist"
    if inst.startswith("Write a program"):
        return "write_a_program"
    if inst[0] in string.punctuation:
        return "punctuation_start"
    if not inst[0].isascii():
        return "non_ascii_start"
    if not (row["output"] or "").strip():
        return "empty_output"
    if (row["input"] or "").strip() and row["input"].strip() == row["output"].strip():
        return "input_equals_output"
    return None


def blacklist_regex(words: list[str]) -> re.Pattern | None:
    if not words:
        return None
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.I)


# ---------------------------------------------------------------- ROUGE-L novelty

_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer: lowercase, `[a-z0-9]+` runs, no stemming."""
    return _TOKEN.findall(text.lower())


def rouge_l_f1(target: list, prediction: list) -> float:
    """ROUGE-L F1 computed exactly as rouge_score's `_score_lcs` does (same float ops)."""
    if not target or not prediction:
        return 0.0
    lcs = LCSseq.similarity(target, prediction)
    precision, recall = lcs / len(prediction), lcs / len(target)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


class NoveltyPool:
    """Instructions seen so far; `best` returns the most similar one and its ROUGE-L F1."""

    def __init__(self, texts: Iterable[str] = ()):
        self.vocab: dict[str, int] = {}
        self.texts: list[str] = []
        self.tokens: list[list[int]] = []
        for t in texts:
            self.add(t)

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in rouge_tokens(text)]

    def add(self, text: str) -> None:
        self.texts.append(text)
        self.tokens.append(self._ids(text))

    def best(self, text: str) -> tuple[float, str | None]:
        new = self._ids(text)
        best, best_text = 0.0, None
        for toks, t in zip(self.tokens, self.texts):
            # F1 <= 2*min(len)/(len_a+len_b): skip pairs that cannot beat the current best.
            if 2 * min(len(new), len(toks)) / max(1, len(new) + len(toks)) <= best:
                continue
            f = rouge_l_f1(new, toks)
            if f > best:
                best, best_text = f, t
        return best, best_text


# ---------------------------------------------------------------- MinHash near duplicates


def shingles(row: dict, n: int) -> set[bytes]:
    words = " ".join([row["instruction"] or "", row["input"] or "", row["output"] or ""]).lower().split()
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


# ---------------------------------------------------------------- the pipeline


def filter_rows(rows: Iterable[dict], seed_instructions: list[str], p: FilterParams) -> Iterator[dict]:
    """Yield every row with `reason` (None when kept), `detail`, `rouge_max` and `rouge_nearest`."""
    from datasketch import MinHash, MinHashLSH

    bl = blacklist_regex(p.blacklist)
    pool = NoveltyPool(seed_instructions)
    lsh = MinHashLSH(threshold=p.minhash_threshold, num_perm=p.minhash_num_perm)
    kept_text: dict[int, str] = {}
    for k, row in enumerate(rows):
        out = {**row, "reason": None, "detail": None, "rouge_max": None, "rouge_nearest": None}
        out["reason"] = rule_reason(row, p, bl)
        if out["reason"] is None:
            score, nearest = pool.best(row["instruction"])
            out["rouge_max"], out["rouge_nearest"] = score, nearest
            if score > p.rouge_threshold:
                out["reason"], out["detail"] = "too_similar", f"ROUGE-L {score:.3f} with: {nearest}"
        if out["reason"] is None:
            mh = MinHash(num_perm=p.minhash_num_perm, seed=1)
            mh.update_batch(list(shingles(row, p.minhash_ngram)))
            dups = lsh.query(mh)
            if dups:
                out["reason"], out["detail"] = "near_duplicate", f"of: {kept_text[min(dups)]}"
            else:
                lsh.insert(k, mh)
                kept_text[k] = row["instruction"]
                pool.add(row["instruction"])
        yield out


def main() -> None:
    p = load_params(FilterParams, "filter")
    seeds = read_shards("data/seeds")
    gen = read_shards("data/generated", "tasks").sort(["request_index", "item_index"])
    rows = list(progress(filter_rows(gen.iter_rows(named=True), seeds["instruction"].to_list(), p), gen.height, "filter"))
    df = pl.DataFrame(rows, schema={**gen.schema, "reason": pl.String, "detail": pl.String,
                                    "rouge_max": pl.Float64, "rouge_nearest": pl.String})
    kept = df.filter(pl.col("reason").is_null()).drop("reason", "detail")
    rejected = df.filter(pl.col("reason").is_not_null())
    unparsed = read_shards("data/generated", "unparsed").height
    by_reason = {r: n for r, n in sorted(rejected["reason"].value_counts().iter_rows())}
    with atomic_dir(p.out_dir) as tmp:
        write_shards(kept, tmp, "kept", p.rows_per_shard)
        write_shards(rejected, tmp, "rejected", p.rows_per_shard)
    write_json("metrics/filter.json", {
        "generated": gen.height + unparsed,
        "unparsed": unparsed,
        "parsed": gen.height,
        "kept": kept.height,
        "rejected": rejected.height,
        "rejected_by_reason": by_reason,
        "keep_rate": round(kept.height / gen.height, 4) if gen.height else 0.0,
    })
    log(f"filter: kept {kept.height} of {gen.height} parsed tasks; rejected {by_reason}")


if __name__ == "__main__":
    run_main(main)
