"""Stage `filter`: Alpaca/self-instruct rule filters, exact ROUGE-L novelty, MinHash-LSH near duplicates.

Steps, in generation order, each recording why it drops a row:
1. rules: instruction word count, blacklist words, "Write a program", punctuation or
   non-ASCII first character, empty output, input equal to output;
2. novelty (`stages.lib.text.novelty`): reject when the instruction's ROUGE-L F1 against the seeds or
   any earlier instruction kept by this step is > threshold (Alpaca's loop, same decisions,
   near-linear time); every row gets its max score and most similar instruction;
3. near duplicates: MinHash LSH (datasketch) over the whole example (instruction, input and
   output); the first example of each cluster is kept, later ones name it as their twin.
   The LSH index is rebuilt from scratch, in order, on every run.
Kept and rejected rows (with reason, detail, scores and twins) go to separate parquet outputs;
counts per reason go to `metrics/filter.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import polars as pl

from stages.lib import paths
from stages.lib.errors import check
from stages.lib.io import atomic_dir, read_shards, write_json, write_shards
from stages.lib.params import load_params, run_main
from stages.lib.progress import log, progress
from stages.lib.stats import DROPPED, Stats
from stages.lib.text.dedup import NearDuplicates, word_shingles
from stages.lib.text.novelty import TOKENIZERS, novelty
from stages.lib.text.rules import REASONS, RuleParams, blacklist_regex, rule_reason


@dataclass
class FilterParams(RuleParams):
    """The rule filters' `min_words`, `max_words` and `blacklist` (`RuleParams`, also read by generate's
    self-instruct bootstrap), then the novelty and near-duplicate settings."""

    rouge_threshold: float = 0.7
    """Reject when ROUGE-L F1 with the seeds or an earlier kept instruction is above this."""
    rouge_tokenizer: str = "rouge_score"
    """`rouge_score` (lowercase `[a-z0-9]+`, as Alpaca) or `unicode` (any script; CJK per character)."""
    minhash_threshold: float = 0.8
    """Estimated Jaccard similarity of whole examples above which a later one is a near duplicate."""
    minhash_num_perm: int = 128
    """MinHash permutations (more: better estimates, slower)."""
    minhash_ngram: int = 3
    """Word n-gram shingles for MinHash."""
    minhash_seed: int = 1
    """Seed of the MinHash permutations."""
    rows_per_shard: int = 50_000
    """Rows per parquet shard."""

    def __post_init__(self):
        check(1 <= self.min_words <= self.max_words, "need 1 <= min_words <= max_words")
        check(0 < self.rouge_threshold <= 1, "rouge_threshold: must be in (0, 1]")
        check(self.rouge_tokenizer in TOKENIZERS, f"rouge_tokenizer: must be one of {TOKENIZERS}")
        check(0 < self.minhash_threshold <= 1, "minhash_threshold: must be in (0, 1]")
        check(self.minhash_num_perm >= 16 and self.minhash_ngram >= 1, "minhash_num_perm >= 16 and minhash_ngram >= 1")


# ---------------------------------------------------------------- the pipeline


def filter_rows(rows: list[dict], seed_instructions: list[str], p: FilterParams,
                seed_ids: list[str] | None = None) -> Iterator[dict]:
    """Yield every row, in order, with `reason` (None when kept), `detail`, `rouge_max`,
    `rouge_nearest` (the most similar earlier instruction), `rouge_nearest_id` and `minhash_twin_id`."""
    bl = blacklist_regex(p.blacklist)
    reasons = [rule_reason(r, p, bl) for r in rows]
    # Novelty is decided once per task: the instances of one self-instruct task (same instruction,
    # same `source` task id) share the decision of its first row. Any other repeated instruction
    # is scored like a new one (ROUGE-L 1.0: rejected, as in Alpaca).
    def task(i: int):
        src = rows[i].get("source") or ""
        return (rows[i]["instruction"], src) if src.startswith("self_instruct:") else i

    first: dict = {}
    for i, r in enumerate(reasons):
        if r is None:
            first.setdefault(task(i), i)
    passed = sorted(first.values())
    nov = novelty(seed_instructions, [rows[i]["instruction"] for i in passed], p.rouge_threshold, p.rouge_tokenizer)
    n_seeds = len(seed_instructions)
    decided = {}
    for j, i in enumerate(passed):
        near = int(nov.nearest[j])
        near_row = None if near < n_seeds else rows[passed[near - n_seeds]]
        decided[task(i)] = (bool(nov.kept[j]), float(nov.score[j]), near, near_row)
    by_row = {i: decided[task(i)] for i, r in enumerate(reasons) if r is None}
    dedup = NearDuplicates(p.minhash_threshold, p.minhash_num_perm, p.minhash_seed)
    for k, row in enumerate(rows):
        out = {**row, "reason": reasons[k], "detail": None, "rouge_max": None, "rouge_nearest": None,
               "rouge_nearest_id": None, "minhash_twin_id": None}
        if k in by_row:
            kept, score, near, near_row = by_row[k]
            out["rouge_max"] = score
            if near >= 0:
                out["rouge_nearest"] = seed_instructions[near] if near_row is None else near_row["instruction"]
                out["rouge_nearest_id"] = (
                    (seed_ids[near] if seed_ids else f"seed-{near}") if near_row is None
                    else near_row.get("id", str(near)))
            if not kept:
                out["reason"] = "too_similar"
                out["detail"] = f"ROUGE-L {score:.3f} with {out['rouge_nearest_id']}: {out['rouge_nearest']}"
            else:
                text = " ".join([row["instruction"] or "", row["input"] or "", row["output"] or ""])
                t = dedup.twin(k, word_shingles(text, p.minhash_ngram))
                if t is not None:
                    out["reason"], out["minhash_twin_id"] = "near_duplicate", rows[t].get("id", str(t))
                    out["detail"] = f"near duplicate of {out['minhash_twin_id']}: {rows[t]['instruction']}"
        yield out


STEP_OF = {"too_similar": "rouge_l", "near_duplicate": "minhash"}
"""The filter step that drops a row for each reason (every other reason: the `rules`)."""


def main() -> None:
    p = load_params(FilterParams, "filter")
    seeds = read_shards(paths.SEEDS)
    gen = read_shards(paths.GENERATED, "tasks").sort(["request_index", "item_index"])
    seed_ids = seeds["id"].to_list()
    rows = list(progress(filter_rows(gen.to_dicts(), seeds["instruction"].to_list(), p, seed_ids),
                         gen.height, "filter"))
    df = pl.DataFrame(rows, schema={**gen.schema, "reason": pl.String, "detail": pl.String, "rouge_max": pl.Float64,
                                    "rouge_nearest": pl.String, "rouge_nearest_id": pl.String,
                                    "minhash_twin_id": pl.String})
    kept = df.filter(pl.col("reason").is_null()).drop("reason", "detail", "minhash_twin_id")
    rejected = df.filter(pl.col("reason").is_not_null()).with_columns(
        step=pl.col("reason").replace_strict(STEP_OF, default="rules", return_dtype=pl.String))
    unparsed = read_shards(paths.GENERATED, "unparsed").height
    by_reason = dict.fromkeys(REASONS, 0) | Stats.of_drops(rejected["reason"].to_list()).dropped_by_reason()
    with atomic_dir(paths.FILTERED) as tmp:
        write_shards(kept, tmp, "kept", p.rows_per_shard)
        write_shards(rejected, tmp, "rejected", p.rows_per_shard)
    write_json(paths.metrics("filter"), {
        "generated": gen.height + unparsed,
        "unparsed": unparsed,
        "parsed": gen.height,
        "kept": kept.height,
        "rejected": rejected.height,
        DROPPED: by_reason,
        "keep_rate": round(kept.height / gen.height, 4) if gen.height else 0.0,
        "kept_rouge_max_mean": round(kept["rouge_max"].mean(), 4) if kept.height else None,
        "rouge_threshold": p.rouge_threshold,  # the report draws the threshold and scores with these
        "rouge_tokenizer": p.rouge_tokenizer,
    })
    log(f"filter: kept {kept.height} of {gen.height} parsed tasks; rejected {by_reason}")


if __name__ == "__main__":
    run_main(main, FilterParams, "filter")
