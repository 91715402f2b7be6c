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
"""The embedded teacher (a Hugging Face model dir)."""
PRUNED = "models/pruned"
"""`prune`'s output: the teacher without its least important layers, the default student's base."""
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
LOGPROBS = "data/teacher_logprobs"
"""`capture`'s teacher top-k log-probabilities per split (`train/`, stages/lib/logprobs/format.py) and `status.json`
(persist output: an interrupted capture resumes)."""
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
MTBENCH_CACHE = "data/mtbench_cache"
"""`python -m stages.tools.mtbench`'s judge calls (content-addressed, append-only; no stage's output)."""
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
    "prune": [PRUNED, metrics("prune")],
    "generate": [GENERATED, TEACHER_CACHE, metrics("generate")],
    "filter": [FILTERED, metrics("filter")],
    "select": [SELECTED, SELECT_CACHE, metrics("select")],
    "ingest": [CONVERSATIONS, metrics("ingest")],
    "tokenize": [TOKENS, metrics("tokenize")],
    "capture": [LOGPROBS, metrics("capture")],
    "train": [STUDENT, TRAIN_LOG],
    "evaluate": [EVAL, EVAL_CACHE, metrics("evaluate"), HEADLINE],
    "report": [REPORT, REPORT_SERIES],
}
"""What each DVC stage writes (outs and metrics in dvc.yaml)."""

INPUTS: dict[str, list[str]] = {
    "seeds": [],
    "teacher_model": [],
    "prune": [TEACHER],
    "generate": [SEEDS, TEACHER],
    "filter": [SEEDS, GENERATED],
    "select": [FILTERED, PRUNED, TEACHER],
    "ingest": [SELECTED],
    "tokenize": [CONVERSATIONS, PRUNED, TEACHER],
    "capture": [TOKENS, TEACHER],
    "train": [TOKENS, LOGPROBS, PRUNED, TEACHER],
    "evaluate": [TOKENS, PRUNED, STUDENT, TEACHER],
    "report": [SEEDS, FILTERED, SELECTED, CONVERSATIONS, PRUNED, TEACHER, metrics("generate"), metrics("filter"),
               metrics("select"), metrics("ingest"),
               metrics("tokenize"), TRAIN_LOG, metrics("evaluate")],
}
"""Which other stages' outputs each DVC stage reads (its data deps in dvc.yaml, besides `seeds/` files)."""


def local_model(name: str, key: str = "model") -> str:
    """`name` as given, when it is a model folder that exists here or reads as a Hugging Face hub id.

    A name that reads as a local path (a stage's output such as `models/student`, absolute, `./` or `~`, a
    first folder that exists here, as in `models/studnet`, or more than one `/`, which no hub id has) but
    is not a folder with files in it
    is one StageError naming the folder and how to make it, before transformers would take it for a
    hub id (a traceback offline; a Hub query online). `key` is the param or option that named it.
    """
    import os

    from stages.lib.errors import StageError

    path = os.path.expanduser(name)
    made_by = {p: stage for stage, outs in OUTPUTS.items() for p in outs}.get(name.rstrip("/"))
    reads_as_path = (made_by or os.path.isabs(path) or name.startswith(("./", "../", "~")) or name.count("/") > 1
                     or name.endswith("/") or ("/" in name and os.path.isdir(name.split("/")[0])))
    if not reads_as_path or (os.path.isdir(path) and any(os.scandir(path))):
        return name
    if made_by:
        how = f"make it with `dvc pull {name.rstrip('/')}` (from the remote) or `dvc repro {made_by}`"
    else:
        parent = os.path.dirname(path.rstrip("/")) or "."
        there = sorted(e.name for e in os.scandir(parent) if e.is_dir()) if os.path.isdir(parent) else []
        how = "a local model folder must exist (a hub id is org/name)" + (
            f"; {parent}/ has: {', '.join(there[:8])}" if there else "")
    state = "is empty" if os.path.isdir(path) else "not found"
    raise StageError(f"{key}: {name}: model folder {state}; {how}")
