"""Stage `select`: score the filtered tasks and keep the best (AlpaGasus rating, Cherry-LLM IFD).

`method` says which scores are computed: `none` (keep every filtered row: the default build's
data are unchanged downstream), `rating` (a judge rates each example 0-5 with AlpaGasus's accuracy
prompt, `stages.lib.selection.rating`), `ifd` (the student base model's instruction-following
difficulty, `stages.lib.selection.ifd`) or `both`. `policy` picks the rows to keep by one score
(`rating`, `ifd`, or `combined`: the mean percentile rank of both) with a threshold, top-k or a
top fraction (`stages.lib.selection.policy`). Every row keeps every score as a column
(`rating`, `rating_raw`, `ifd`, `loss_conditioned`, `loss_response`); rejected rows name the
score and value that decided (`reason`, `select_score`).

Judge calls go through the teacher client and its content-addressed cache (`data/select_cache`, a
persist output), so changing only the policy reruns this stage with zero judge calls; a paid
API judge is priced by `prices` and stopped by `api.max_cost_usd` before it overspends.
Outputs: `kept-*.parquet` (what ingest reads) and `rejected-*.parquet` in `data/selected`, and
`metrics/select.json` (counts, score distributions, the cut, judge calls and cost).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from stages.lib import paths
from stages.lib.errors import StageError, check
from stages.lib.io import atomic_dir, read_shards, write_json, write_shards
from stages.lib.llm.endpoint import ApiParams, EndpointParams, Price, default_prices, price_for
from stages.lib.params import convert_fields, load_params, run_main, set_threads
from stages.lib.progress import log
from stages.lib.selection.policy import Policy, apply, combined
from stages.lib.stats import DROPPED, Stats
from stages.lib.student import load_student
from stages.lib.tokens.templates import TEMPLATES

METHODS = ("none", "rating", "ifd", "both")
SCORE_COLUMNS = {"rating": pl.Float64, "rating_raw": pl.String, "ifd": pl.Float64, "loss_conditioned": pl.Float64,
                 "loss_response": pl.Float64, "combined": pl.Float64, "select_score": pl.Float64,
                 "reason": pl.String}


@dataclass
class PolicyParams:
    """Which rows to keep (`select.policy`): one score and exactly one of threshold, top_k, top_fraction
    (set the others to null, e.g. `-S select.policy.threshold=null -S select.policy.top_k=1000`)."""

    score: str = "rating"
    """rating (the judge's 0-5) | ifd (Cherry-LLM) | combined (mean percentile rank of both; method both)."""
    threshold: float | None = None
    """Keep rows whose score is >= this (AlpaGasus: rating >= 4.5, the default of `select.policy`)."""
    top_k: int | None = None
    """Keep the k best rows."""
    top_fraction: float | None = None
    """Keep the best fraction of rows (Cherry-LLM: ifd, 0.1)."""


@dataclass
class TemplateParam:
    """`tokenize.template`, read by IFD so that its conditioned loss sees the student's training prompt."""

    template: str = "alpaca"


@dataclass
class SelectParams:
    method: str = "none"
    """Scores to compute: none (keep every filtered row) | rating (judge) | ifd (student base model) | both."""
    policy: PolicyParams = field(default_factory=lambda: PolicyParams(threshold=4.5))
    """Which rows to keep by which score; AlpaGasus: {score: rating, threshold: 4.5}; Cherry-LLM: {score: ifd,
    threshold: null, top_fraction: 0.1}."""
    keep_unknown: bool = False
    """Keep rows whose deciding score is unknown (an unreadable verdict, a failed call); false: rejected as unknown."""
    ifd_max: float = 1.0
    """With an IFD policy, reject rows with IFD >= this first (the instruction does not help; Cherry-LLM); 0: off.
    IFD is computed with the student's base model (`student.model`) and prompt template (`tokenize.template`)."""
    judge: EndpointParams = field(default_factory=EndpointParams)
    """The rating judge: backend local|openai, model, base_url, prompt_form, system_prompt, extra_body, model_family,
    reasoning_budget (as `evaluate.judge`); default: the embedded teacher."""
    judge_max_new_tokens: int = 32
    """Length budget of a verdict (the score is asked for on the first line)."""
    api: ApiParams = field(default_factory=ApiParams)
    """API judge: concurrency, rate limits, retries, timeout and max_cost_usd (the hard budget of this run's calls,
    checked before each request), as `generate.api`."""
    prices: dict[str, Price] = field(default_factory=default_prices)
    """API judge: USD per million tokens by judge model, as generate.prices (a model not listed: cost reported as 0)."""
    max_seq_len: int = 512
    """IFD: tokens per example (prompt + response); longer responses are cut."""
    batch_size: int = 8
    """IFD forward batch and local judge generation batch."""
    dtype: str = "float32"
    """Local models' weights dtype."""
    seed: int = 0
    """Seed of the judge's decoding (greedy by default)."""
    histogram_bins: int = 20
    """Bins of the score histograms in metrics/select.json and the report."""
    teacher_store: str | None = None
    """The store outside the repository that also keeps every judge response (as `generate.teacher_store`)."""
    rows_per_shard: int = 50_000
    """Rows per parquet shard."""

    MOVED = {"concurrency": "api.concurrency", "max_cost_usd": "api.max_cost_usd"}

    def __post_init__(self):
        convert_fields(self, "select")
        check(self.method in METHODS, f"method: expected one of {METHODS}, got {self.method!r}")
        try:
            self.pol = Policy.from_dict({k: v for k, v in asdict(self.policy).items() if v is not None})
        except ValueError as e:
            hint = " (set the others to null, e.g. -S select.policy.threshold=null)" if "exactly one" in str(e) else ""
            raise StageError(f"select.{e}{hint}") from None  # `select.policy: ...`, the key as -S names it
        need = {"rating": {"rating", "both"}, "ifd": {"ifd", "both"}, "combined": {"both"}}[self.pol.score]
        if self.method != "none" and self.method not in need:
            raise StageError(f"select.policy.score {self.pol.score}: needs select.method "
                             f"{' or '.join(sorted(need))}, got {self.method!r}")
        check(self.judge_max_new_tokens >= 1 and self.batch_size >= 1 and self.max_seq_len >= 8, "sizes: must be >= 1")
        check(self.ifd_max >= 0, "ifd_max: must be >= 0")
        check(self.histogram_bins >= 2, "histogram_bins: must be >= 2")


# ---------------------------------------------------------------- scores


def rate(rows: list[dict], ask, p: SelectParams) -> dict:
    """Fill `rating` (None: unknown) and `rating_raw` in each row; `ask(prompts, sampling)` -> records."""
    from stages.lib.llm.types import Sampling
    from stages.lib.selection.rating import parse_rating, rating_prompt

    prompts = [rating_prompt(r["instruction"], r.get("input") or "", r["output"]) for r in rows]
    records = ask(prompts, Sampling(p.judge_max_new_tokens, 0.0, 1.0, (), p.seed)) if prompts else []
    failed = 0
    for r, rec in zip(rows, records):
        failed += rec is None
        r["rating_raw"] = rec["text"] if rec else None
        r["rating"] = parse_rating(r["rating_raw"])
    return {"failed": failed, "unknown": sum(r["rating"] is None for r in rows)}


def judge_client(p: SelectParams):
    """The judge's client on the select cache, priced and budgeted."""
    from stages.lib.llm.client import open_client

    return open_client(p.judge, paths.SELECT_CACHE, store=p.teacher_store, api=p.api,
                       price=price_for(p.prices, p.judge.model), batch_size=p.batch_size, dtype=p.dtype,
                       role="judge")


def add_ifd(rows: list[dict], p: SelectParams, model_name: str, template: str) -> None:
    """IFD with the student's base model `model_name` and its prompt template (`tokenize.template`)."""
    from stages.lib.llm.local import load_model
    from stages.lib.selection.ifd import ifd_scores

    check(template in TEMPLATES, f"tokenize.template: expected one of {sorted(TEMPLATES)}, got {template!r}")
    model, tok = load_model(model_name, p.dtype)
    for r, (ifd, lc, la) in zip(rows, ifd_scores(rows, model, tok, template, p.max_seq_len, p.batch_size)):
        r.update(ifd=ifd, loss_conditioned=lc, loss_response=la)


# ---------------------------------------------------------------- the choice


def choose(rows: list[dict], p: SelectParams) -> float | None:
    """Set `select_score` and `reason` (None: kept) on every row by the policy; returns the cut."""
    for r in rows:
        for c in SCORE_COLUMNS:
            r.setdefault(c, None)
    if p.method == "none":
        return None
    if p.method == "both":
        for r, c in zip(rows, combined({"rating": [r["rating"] for r in rows], "ifd": [r["ifd"] for r in rows]})):
            r["combined"] = c
    pol = p.pol
    todo = list(range(len(rows)))
    if pol.score in ("ifd", "combined") and p.ifd_max > 0:
        for i in todo:
            if rows[i]["ifd"] is not None and rows[i]["ifd"] >= p.ifd_max:
                rows[i].update(reason="ifd_at_or_above_max", select_score=rows[i]["ifd"])
        todo = [i for i in todo if rows[i]["reason"] is None]
    scores = [rows[i][pol.score] for i in todo]
    _, reasons, cut = apply(pol, scores, p.keep_unknown)
    for i, s, why in zip(todo, scores, reasons):
        rows[i].update(select_score=s, reason=why)
    return cut


def distribution(values: list[float | None], lo: float, hi: float, bins: int, kept: list[bool]) -> dict:
    known = [(v, k) for v, k in zip(values, kept) if v is not None]
    edges = np.linspace(lo, hi, bins + 1)
    def counts(vals):
        idx = np.clip(np.searchsorted(edges, np.asarray(vals, dtype=float), side="right") - 1, 0, bins - 1)
        return np.bincount(idx, minlength=bins).tolist() if len(vals) else [0] * bins
    v = [x for x, _ in known]
    return {"n": len(known), "unknown": len(values) - len(known),
            "mean": round(float(np.mean(v)), 4) if v else None,
            "quantiles": {q: round(float(np.quantile(v, float(q))), 4) for q in ("0.1", "0.5", "0.9")} if v else {},
            "edges": [round(float(e), 6) for e in edges],
            "kept": counts([x for x, k in known if k]), "rejected": counts([x for x, k in known if not k])}


def metrics_of(rows: list[dict], p: SelectParams, cut: float | None) -> dict:
    kept = [r["reason"] is None for r in rows]
    scores = {}
    for name, lo, hi in (("rating", 0.0, 5.0), ("ifd", 0.0, 1.5), ("combined", 0.0, 1.0)):
        vals = [r[name] for r in rows]
        if any(v is not None for v in vals) or (name == "rating" and p.method in ("rating", "both")):
            if name == "ifd":
                hi = max(hi, max((v for v in vals if v is not None), default=hi))
            scores[name] = distribution(vals, lo, hi, p.histogram_bins, kept)
    return {"method": p.method, "policy": None if p.method == "none" else p.pol.describe(),
            "score": None if p.method == "none" else p.pol.score, "cut": cut,
            "rows": len(rows), "kept": sum(kept), "rejected": len(rows) - sum(kept),
            "keep_rate": round(sum(kept) / len(rows), 4) if rows else 0.0,
            DROPPED: Stats.of_drops(r["reason"] for r in rows if r["reason"]).dropped_by_reason(), "scores": scores}


def main() -> None:
    p = load_params(SelectParams, "select")
    set_threads()
    Path(paths.SELECT_CACHE).mkdir(parents=True, exist_ok=True)  # a DVC output even when no judge is asked
    df = read_shards(paths.FILTERED, "kept")
    rows = df.to_dicts()
    judge = {"requests": 0, "cache_hits": 0, "calls": 0, "failed": 0, "unknown": 0, "prompt_tokens": 0,
             "completion_tokens": 0, "cost_usd": 0.0}
    if p.method in ("rating", "both"):
        client = judge_client(p)
        got = rate(rows, client.query, p)
        s, price = client.stats, client.price
        judge.update(requests=s.requests, cache_hits=s.cache_hits, calls=s.teacher_calls, failed=got["failed"],
                     unknown=got["unknown"], prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
                     cost_usd=round(price.cost(s.prompt_tokens, s.completion_tokens), 6) if price else 0.0)
        if s.failed_by_reason.get("budget"):
            raise StageError(f"select: budget api.max_cost_usd={p.api.max_cost_usd} reached; "
                             f"{s.failed_by_reason['budget']} "
                             "ratings not asked (raise the budget; paid verdicts are cached)")
    if p.method in ("ifd", "both"):
        add_ifd(rows, p, paths.local_model(load_student().model, "student.model"),
                load_params(TemplateParam, "tokenize", only_own_keys=True).template)
    cut = choose(rows, p)
    out = pl.DataFrame(rows, schema={**df.schema, **SCORE_COLUMNS})
    kept = out.filter(pl.col("reason").is_null())
    rejected = out.filter(pl.col("reason").is_not_null()).with_columns(
        step=pl.lit("select"),  # only a policy rejects (method none keeps all): its score is the detail
        detail=pl.concat_str(pl.lit(f"{p.pol.score} = "), pl.col("select_score").cast(pl.String).fill_null("unknown")))
    with atomic_dir(paths.SELECTED) as tmp:
        write_shards(kept, tmp, "kept", p.rows_per_shard)
        write_shards(rejected, tmp, "rejected", p.rows_per_shard)
    m = metrics_of(rows, p, cut) | {"judge": judge}
    write_json(paths.metrics("select"), m)
    log(f"select ({p.method}{', ' + m['policy'] if m['policy'] else ''}): kept {m['kept']} of {m['rows']}; "
        f"rejected {m[DROPPED]}; judge {judge['calls']} calls, {judge['cache_hits']} cached, "
        f"{judge['unknown']} unknown")


if __name__ == "__main__":
    run_main(main, SelectParams, "select")
