"""Stage `seeds`: validate seed tasks (self-instruct JSONL schema) and write them as parquet.

Schema of one line: {"id": str, "name": str, "instruction": str,
"instances": [{"input": str, "output": str}, ...], "is_classification": bool}.
Any bad line stops the stage with `file:line: field: problem`; nothing is written,
so nothing downstream runs on bad seeds. Text from the wild is not a bad line: invalid UTF-8,
lone surrogates and NULs are repaired, and a task over the size cap is dropped (both logged
and counted in `stats.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from stages.lib import paths
from stages.lib.errors import StageError, check
from stages.lib.io import atomic_dir, write_json, write_shards
from stages.lib.params import load_params, run_main
from stages.lib.progress import log
from stages.lib.stats import Stats
from stages.lib.text.clean import MAX_TEXT_CHARS, clean_json, decode, load_json, too_long

MAX_ERRORS = 20


@dataclass
class SeedsParams:
    files: list[str] = field(default_factory=lambda: ["seeds/seed_tasks.jsonl"])
    """Seed JSONL files, read in this order (output: `data/seeds/part-*.parquet`, one row per seed task)."""

    def __post_init__(self):
        check(len(self.files) > 0, "files: list at least one seed file")


def _check_record(rec: object) -> list[str]:
    """Problems with one parsed record, each as 'field: message'."""
    if not isinstance(rec, dict):
        return [f"record: expected a JSON object, got {type(rec).__name__}"]
    errs = []
    for key in ("id", "name", "instruction"):
        v = rec.get(key)
        if key not in rec:
            errs.append(f"{key}: missing")
        elif not isinstance(v, str):
            errs.append(f"{key}: expected a string, got {type(v).__name__}")
        elif not v.strip():
            errs.append(f"{key}: empty")
    if "is_classification" not in rec:
        errs.append("is_classification: missing")
    elif not isinstance(rec["is_classification"], bool):
        errs.append("is_classification: expected true or false")
    inst = rec.get("instances")
    if "instances" not in rec:
        errs.append("instances: missing")
    elif not isinstance(inst, list) or not inst:
        errs.append("instances: expected a non-empty list")
    else:
        for j, x in enumerate(inst):
            if not isinstance(x, dict):
                errs.append(f"instances[{j}]: expected an object")
                continue
            for key in ("input", "output"):
                if key not in x:
                    errs.append(f"instances[{j}].{key}: missing")
                elif not isinstance(x[key], str):
                    errs.append(f"instances[{j}].{key}: expected a string")
            if isinstance(x.get("output"), str) and not x["output"].strip():
                errs.append(f"instances[{j}].output: empty")
    extra = sorted(set(rec) - {"id", "name", "instruction", "instances", "is_classification"})
    if extra:
        errs.append(f"{extra[0]}: unknown field")
    return errs


def parse_seed_file(path: Path, data: bytes, seen_ids: dict[str, str], counts: Stats | None = None,
                    max_chars: int = MAX_TEXT_CHARS) -> tuple[list[dict], list[str]]:
    """Parse and check one seed file's bytes. Returns (records, errors as 'file:line: ...').

    Text from the wild is repaired, not refused (`stages.lib.text.clean`: invalid UTF-8 bytes and lone
    surrogates become U+FFFD, NULs go), counted in `counts["repaired"]`; a task holding a text over
    `max_chars` is dropped (logged, `counts["too_long"]`) so it never reaches a teacher prompt."""
    counts = Stats() if counts is None else counts
    if not data.strip():
        return [], [f"{path}: empty file (no seed tasks)"]
    records, errors = [], []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        text = decode(raw)
        try:
            parsed = load_json(text)
        except json.JSONDecodeError as e:
            errors.append(f"{path}:{lineno}: line: invalid JSON ({e.msg} at column {e.colno})")
            continue
        rec = clean_json(parsed)
        if rec != parsed or text != raw.decode("utf-8", "surrogateescape"):
            counts["repaired"] += 1
            log(f"seeds: {path}:{lineno}: text repaired (invalid UTF-8, lone surrogates or NULs)")
        why = too_long(rec, max_chars)
        if why:
            counts["too_long"] += 1
            log(f"seeds: {path}:{lineno}: task dropped, {why}")
            continue
        problems = _check_record(rec)
        if not problems:
            if rec["id"] in seen_ids:
                problems = [f"id: duplicate '{rec['id']}' (first at {seen_ids[rec['id']]})"]
            else:
                seen_ids[rec["id"]] = f"{path}:{lineno}"
        errors += [f"{path}:{lineno}: {p}" for p in problems]
        if not problems:
            records.append(
                {
                    "id": rec["id"],
                    "name": rec["name"],
                    "instruction": rec["instruction"].strip(),
                    "instances": [{"input": x["input"], "output": x["output"]} for x in rec["instances"]],
                    "is_classification": rec["is_classification"],
                    "source": f"{path}:{lineno}",
                }
            )
    return records, errors


def load_seeds(files: list[str | Path], counts: Stats | None = None) -> pl.DataFrame:
    """Read and validate every seed file; raise StageError listing the problems. `counts`: repaired and
    too_long tasks (see `parse_seed_file`)."""
    records, errors, seen = [], [], {}
    for f in files:
        path = Path(f)
        try:
            data = path.read_bytes()
        except OSError as e:
            errors.append(f"{path}: cannot read ({e.strerror})")
            continue
        recs, errs = parse_seed_file(path, data, seen, counts)
        records += recs
        errors += errs
    if errors:
        more = f"\n  ... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise StageError(f"{len(errors)} problem(s) in seed tasks:\n  " + "\n  ".join(errors[:MAX_ERRORS]) + more)
    return pl.DataFrame(
        records,
        schema={
            "id": pl.String,
            "name": pl.String,
            "instruction": pl.String,
            "instances": pl.List(pl.Struct({"input": pl.String, "output": pl.String})),
            "is_classification": pl.Boolean,
            "source": pl.String,
        },
    )


def main() -> None:
    p = load_params(SeedsParams, "seeds")
    counts = Stats()
    df = load_seeds(p.files, counts)
    with atomic_dir(paths.SEEDS) as tmp:
        write_shards(df, tmp)
        # repaired / too_long only when there were some: clean seeds keep the stats (and output hash) they had
        write_json(tmp / "stats.json", {"tasks": df.height, "classification": int(df["is_classification"].sum()),
                                        **{f"text_{k}": v for k, v in sorted(counts.items())}})
    log(f"seeds: {df.height} tasks ({int(df['is_classification'].sum())} classification) -> {paths.SEEDS}")


if __name__ == "__main__":
    run_main(main, SeedsParams, "seeds")
