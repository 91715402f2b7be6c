"""Length-controlled win rate (AlpacaEval 2's GLM) of any pairwise judgments: annotations in, raw and LC win rate out.

    python -m stages.tools.lcwinrate annotations.json                 # AlpacaEval's annotations.json
    python -m stages.tools.lcwinrate data/eval --metrics lc.json      # evaluate's judgments, per eval set
    python -m stages.tools.lcwinrate judged.jsonl --difficulty difficulty.json

Input: a JSON array or JSONL file of {output_1, output_2, preference} (AlpacaEval's annotations: output 1 the
baseline, output 2 the model; preference 1 baseline, 2 model, 0 or 1.5 a draw, None not judged), or evaluate's
judgments (a folder of `judgments-*.parquet`, or a file of rows {reference, answer, preference}: the reference
is output 1, the student output 2). Rows are grouped by `set` (evaluate's) or else `generator_2`, one fit each.

For each group: the raw win rate ± standard error, the length-controlled win rate (the GLM's mean predicted
preference at zero length difference, x100), the fitted weights and C, and a warning when the two differ
wildly, as AlpacaEval warns. `--difficulty`: a JSON object instruction -> difficulty adds AlpacaEval's
per-instruction term (only AlpacaEval's 805 instructions have one). docs/evaluation.md, "Length-controlled
win rate", says what is simplified and why.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stages.lib.errors import StageError
from stages.lib.params import run_main


def load_rows(path: str) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        from stages.lib.io import read_shards

        return read_shards(p, "judgments").to_dicts()
    if not p.is_file():
        raise StageError(f"{path}: not found")
    if p.suffix == ".parquet":
        import polars as pl

        return pl.read_parquet(p).to_dicts()
    text = p.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: not JSON or JSONL ({e.msg}, line {e.lineno})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise StageError(f"{path}: expected JSON objects")
    return rows


def pair(row: dict, i: int) -> tuple[str, str, float | None]:
    """(output 1, output 2, preference) of an AlpacaEval annotation or an evaluate judgment."""
    try:
        if "output_1" in row:
            return str(row["output_1"]), str(row["output_2"]), row["preference"]
        return str(row["reference"]), str(row["answer"]), row["preference"]
    except KeyError as e:
        raise StageError(f"row {i}: no {e.args[0]!r} (expected output_1, output_2, preference or reference, answer, "
                         "preference)") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.tools.lcwinrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("annotations", nargs="?", help="annotations (JSON / JSONL / parquet) or a judgments folder")
    ap.add_argument("--metrics", help="write the results here (JSON, one entry per group)")
    ap.add_argument("--difficulty", help="JSON object: instruction -> AlpacaEval's instruction difficulty")
    ap.add_argument("--force", action="store_true", help="replace an existing --metrics file")
    a = ap.parse_args(argv)
    if not a.annotations:
        raise StageError("give an annotations file or a judgments folder (see --help)")
    if a.metrics and not a.force and Path(a.metrics).exists():
        raise StageError(f"--metrics: {a.metrics} exists; pass --force to replace it")

    from stages.lib.evals import lc

    rows = load_rows(a.annotations)
    difficulty = json.loads(Path(a.difficulty).read_text()) if a.difficulty else None
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get("set", r.get("generator_2", "model"))), []).append(r)
    results = {}
    for name, group in sorted(groups.items()):
        pairs = [pair(r, i) for i, r in enumerate(group)]
        diff = None
        if difficulty is not None:
            missing = [r.get("instruction") for r in group if r.get("instruction") not in difficulty]
            if missing:
                raise StageError(f"--difficulty: no difficulty for {len(missing)} instructions of {name} "
                                 f"(first: {str(missing[0])[:60]!r})")
            diff = [difficulty[r["instruction"]] for r in group]
        pref = [None if p is None or p != p else p for _, _, p in pairs]
        if sum(p is not None for p in pref) < 2:
            print(f"{name}: fewer than 2 judged pairs, no fit")
            continue
        res = lc.length_controlled(pref, [x for x, _, _ in pairs], [y for _, y, _ in pairs], difficulty=diff)
        results[name] = res.as_dict()
        print(f"{name}: win rate {res.win_rate:.2f} ± {res.standard_error:.2f}, length-controlled "
              f"{res.length_controlled_winrate:.2f} (n={res.n_fitted}; length weight "
              f"{res.weights['tanh_std_delta_len']:.3f}, C={res.C:.3g})"
              + ("  WARNING: very different from the raw win rate" if res.extreme_change else ""))
    if a.metrics:
        from stages.lib.io import write_json

        write_json(a.metrics, results)


if __name__ == "__main__":
    run_main(main)
