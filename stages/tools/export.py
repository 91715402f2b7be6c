"""Export the kept dataset as Alpaca JSON, ShareGPT JSON or a Hugging Face `datasets` directory.

    python -m stages.tools.export --format alpaca --out alpaca.json      # data/filtered, kept rows
    python -m stages.tools.export --format sharegpt --out sharegpt.json  # one human/gpt exchange per task
    python -m stages.tools.export --format hf --out instructions_hf      # datasets.load_from_disk(...) opens it
    python -m stages.tools.export --format sharegpt --from conversations --out mix.json   # data/conversations

`--from filtered` (the default) reads the kept tasks (`kept-*.parquet`: instruction, input,
output); `--from conversations` reads the ingested mixture (`conversations-*.parquet`, possibly
multi-turn, with system messages). Alpaca holds one instruction and one output, so a
conversation with more than one exchange or a system message is an error naming its id (export
it as sharegpt or hf). A task's user turn is its instruction, then a blank line and its input,
as `ingest` and `tokenize` render it. Every file is written to a temporary path and renamed.
Not a DVC stage: run it after `dvc repro` or `dvc pull data/filtered`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from stages.lib import paths
from stages.lib.errors import StageError, check
from stages.lib.formats import Malformed
from stages.lib.io import atomic_dir, atomic_file, read_shards, refuse_nonempty_out
from stages.lib.params import run_main
from stages.lib.progress import log

FORMATS = ("alpaca", "sharegpt", "hf")
SOURCES = {"filtered": (paths.FILTERED, "kept"), "conversations": (paths.CONVERSATIONS, "conversations")}
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


@dataclass
class ExportArgs:
    format: str
    """alpaca (JSON list of instruction/input/output) | sharegpt (JSON list of id + conversations) | hf."""
    out: str
    """Output: a .json file (alpaca, sharegpt) or a directory (hf)."""
    source: str = "filtered"
    """filtered: the kept tasks of `data/filtered` | conversations: the ingested `data/conversations`."""
    in_dir: str | None = None
    """The source's shard folder (default: data/filtered or data/conversations)."""
    force: bool = False
    """Replace an existing non-empty `out` (without it, export refuses: `hf` would delete the folder)."""

    def __post_init__(self):
        check(self.format in FORMATS, f"--format: expected one of {FORMATS}, got {self.format!r}")
        check(self.source in SOURCES, f"--from: expected one of {sorted(SOURCES)}, got {self.source!r}")
        check(bool(self.out), "--out: required")
        self.in_dir = self.in_dir or SOURCES[self.source][0]
        refuse_nonempty_out(self.out, self.force)


# ---------------------------------------------------------------- pure conversions


def tasks(rows: list[dict]) -> list[dict]:
    """Kept tasks as {id, instruction, input, output}; a missing or non-string field is an error naming the row."""
    out = []
    for k, r in enumerate(rows):
        for name in ("instruction", "output"):
            if not isinstance(r.get(name), str):
                raise StageError(f"task {r.get('id', k)}: {name}: expected a string")
        out.append({"id": str(r.get("id") or k), "instruction": r["instruction"], "input": r.get("input") or "",
                    "output": r["output"]})
    return out


def task_messages(task: dict) -> list[dict]:
    """A task as one user/assistant exchange: instruction, blank line, input (ingest's rendering)."""
    from stages.lib.formats import to_messages

    try:
        [(_, msgs)] = to_messages(task, "alpaca")
    except Malformed as e:
        raise StageError(f"task {task.get('id')}: {e}") from None
    return msgs


def to_alpaca(tasks_: list[dict]) -> list[dict]:
    return [{"instruction": t["instruction"], "input": t["input"], "output": t["output"]} for t in tasks_]


def conversations_to_alpaca(convs: list[dict]) -> list[dict]:
    """Single-exchange conversations as Alpaca rows (input empty); anything longer is an error."""
    out = []
    for c in convs:
        roles = [m["role"] for m in c["messages"]]
        if roles != ["user", "assistant"]:
            raise StageError(f"conversation {c['id']}: roles {roles}: Alpaca holds one instruction and one output "
                             "(export it with --format sharegpt or hf)")
        out.append({"instruction": c["messages"][0]["content"], "input": "", "output": c["messages"][1]["content"]})
    return out


def to_sharegpt(convs: list[dict]) -> list[dict]:
    """ShareGPT/FastChat rows: {id, conversations: [{from: system|human|gpt, value}]}."""
    return [{"id": c["id"], "conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]}
                                              for m in c["messages"]]} for c in convs]


def conversations(rows: list[dict]) -> list[dict]:
    """Ingested conversations as {id, source, messages: [{role, content}]}."""
    return [{"id": r["id"], "source": r.get("source"),
             "messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]} for r in rows]


def records(source: str, fmt: str, rows: list[dict]) -> list[dict]:
    """The rows to write for `fmt`, from source rows (`filtered` kept tasks or `conversations`)."""
    if source == "filtered":
        ts = tasks(rows)
        if fmt == "alpaca":
            return to_alpaca(ts)
        if fmt == "sharegpt":
            return to_sharegpt([{"id": t["id"], "messages": task_messages(t)} for t in ts])
        return ts
    convs = conversations(rows)
    if fmt == "alpaca":
        return conversations_to_alpaca(convs)
    return to_sharegpt(convs) if fmt == "sharegpt" else convs


# ---------------------------------------------------------------- writers


def write_json_list(path: str | Path, rows: list[dict]) -> None:
    with atomic_file(path) as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
        f.write("\n")


def write_hf(path: str | Path, rows: list[dict]) -> None:
    """A `datasets.Dataset` saved with `save_to_disk` (needs the `export` extra: pip install -e '.[export]')."""
    try:
        import datasets
    except ImportError:
        raise StageError("--format hf needs the `datasets` package: pip install -e '.[export]'") from None
    with atomic_dir(path) as tmp:
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))


def export(args: ExportArgs, rows: list[dict]) -> int:
    """Write `rows` of `args.source` in `args.format` to `args.out`; returns the number written."""
    out = records(args.source, args.format, rows)
    if args.format == "hf":
        write_hf(args.out, out)
    else:
        write_json_list(args.out, out)
    return len(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.tools.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", required=True, choices=FORMATS,
                    help="alpaca (JSON list of instruction/input/output) | sharegpt (JSON list of id + "
                         "conversations) | hf")
    ap.add_argument("--out", required=True, help="a .json file (alpaca, sharegpt) or a directory (hf)")
    ap.add_argument("--from", dest="source", default="filtered", choices=sorted(SOURCES),
                    help="filtered: the kept tasks of data/filtered (default) | conversations: data/conversations")
    ap.add_argument("--in", dest="in_dir",
                    help="the source's shard folder (default: data/filtered or data/conversations)")
    ap.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    a = ap.parse_args(argv)
    try:
        args = ExportArgs(a.format, a.out, a.source, a.in_dir, a.force)
    except ValueError as e:
        raise StageError(str(e)) from None
    rows = read_shards(args.in_dir, SOURCES[args.source][1]).to_dicts()
    n = export(args, rows)
    log(f"export: {n} {args.format} records from {args.in_dir} -> {args.out}")


if __name__ == "__main__":
    run_main(main)
