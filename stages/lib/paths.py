"""Where each stage writes and reads: the one list of the paths between stages.

Every stage and tool reads and writes these paths (relative to the project root); they are not
params, because the next stage and `dvc.yaml` must agree on them. `OUTPUTS` and `INPUTS` say,
per DVC stage, what it writes and which other stages' outputs it reads; a test checks them
against `dvc.yaml`'s `outs`, `metrics` and `deps`.
"""

from __future__ import annotations

SEEDS = "data/seeds"
"""Validated seed tasks (`part-*.parquet`, `stats.json`)."""
TEACHER = "models/teacher"
"""The embedded teacher (a Hugging Face model dir); also the default student base."""
GENERATED = "data/generated"
"""Teacher-written tasks (`tasks-*.parquet`) and unparsed items (`unparsed-*.parquet`)."""
TEACHER_CACHE = "data/teacher_cache"
"""Content-addressed teacher responses (append-only, persist output; no stage depends on it)."""
FILTERED = "data/filtered"
"""Kept (`kept-*.parquet`) and rejected (`rejected-*.parquet`) tasks."""
SELECTED = "data/selected"
"""The selected tasks (`kept-*.parquet`, what ingest reads) and the rest (`rejected-*.parquet`), with scores."""
SELECT_CACHE = "data/select_cache"
"""Content-addressed judge ratings of `select` (append-only, persist output)."""
CONVERSATIONS = "data/conversations"
"""The mixture's conversations (`conversations-*.parquet`) and the drops (`dropped-*.parquet`)."""
TOKENS = "data/tokens"
"""Token arrays per split and `meta.json`."""
STUDENT = "models/student"
"""The trained student (a Hugging Face model dir)."""
CHECKPOINT = "models/checkpoint"
"""train's resumable checkpoint (not a DVC output; removed when training completes)."""
TRAIN_LOG = "metrics/train"
"""train's dvclive folder (`metrics.json`, `plots/`)."""
EVAL = "data/eval"
"""evaluate's judgments (`judgments-*.parquet`) and IFEval answers with their verdicts (`ifeval-*.parquet`)."""
HEADLINE = "metrics/headline.json"
"""evaluate's headline: the few numbers that decide between students (`dvc exp show --keep '^headline\\.'`)."""
EVAL_CACHE = "data/eval_cache"
"""Content-addressed student, teacher and judge responses (append-only, persist output)."""
REPORT = "data/report"
"""The HTML data report (`index.html`)."""
REPORT_SERIES = "metrics/report"
"""The report's CSV series and `summary.json` (kept in git for `dvc plots`)."""


def metrics(stage: str) -> str:
    """The metrics file of a stage: `metrics/{stage}.json` (evaluate writes `metrics/eval.json`)."""
    return f"metrics/{'eval' if stage == 'evaluate' else stage}.json"


OUTPUTS: dict[str, list[str]] = {
    "seeds": [SEEDS],
    "teacher_model": [TEACHER],
    "generate": [GENERATED, TEACHER_CACHE, metrics("generate")],
    "filter": [FILTERED, metrics("filter")],
    "select": [SELECTED, SELECT_CACHE, metrics("select")],
    "ingest": [CONVERSATIONS, metrics("ingest")],
    "tokenize": [TOKENS, metrics("tokenize")],
    "train": [STUDENT, TRAIN_LOG],
    "evaluate": [EVAL, EVAL_CACHE, metrics("evaluate"), HEADLINE],
    "report": [REPORT, REPORT_SERIES],
}
"""What each DVC stage writes (outs and metrics in dvc.yaml)."""

INPUTS: dict[str, list[str]] = {
    "seeds": [],
    "teacher_model": [],
    "generate": [SEEDS, TEACHER],
    "filter": [SEEDS, GENERATED],
    "select": [FILTERED, TEACHER],
    "ingest": [SELECTED],
    "tokenize": [CONVERSATIONS, TEACHER],
    "train": [TOKENS, TEACHER],
    "evaluate": [TOKENS, STUDENT, TEACHER],
    "report": [SEEDS, FILTERED, SELECTED, CONVERSATIONS, TEACHER, metrics("generate"), metrics("filter"),
               metrics("select"), metrics("ingest"),
               metrics("tokenize"), TRAIN_LOG, metrics("evaluate")],
}
"""Which other stages' outputs each DVC stage reads (its data deps in dvc.yaml, besides `seeds/` files)."""
