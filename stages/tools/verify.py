"""Check answers from anywhere with stillhouse's verifiers: one verdict per row of {answer|response, gold}.

    python -m stages.tools.verify answers.jsonl --kind math                     # verdicts to stdout
    python -m stages.tools.verify answers.jsonl --kind short --out verdicts.jsonl
    python -m stages.tools.verify solutions.jsonl --kind code --wall-s 10

Rows (JSON Lines): `answer` or `response` (a whole reply: the last \\boxed{} or `#### n` is its answer, for
code its last ```python block), and `gold`: for math the gold answer (MATH's `answer`, a solution with a
boxed answer, or GSM8K's `... #### 18`), for short answers the answer text or number, for code the tests
(`tests` or `gold`: a list of {input, output} cases, or a string of Python asserts). Other fields are
ignored. `--kind math` uses Hugging Face's Math-Verify, `short` exact or numeric match (`--mode`), `code`
runs the tests in the subprocess sandbox (CPU, memory and wall limits, a scratch folder, a scrubbed
environment, no network where the kernel allows: docs/reasoning.md).

Each verdict line: {row, ok, reason, extracted, gold, by, detail, verifier}; `verifier` is the verifier's
identity (kind, versions of stillhouse's verifier and of math-verify), the same as the verify stage keys its
cache on. A summary (accepted / rows, by reason) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.lib.errors import StageError
from stages.lib.params import run_main


def read_rows(path: str, kind: str) -> list[tuple[str, object]]:
    """(answer, gold) of each row; a row without them stops the tool with its line number."""
    p = Path(path)
    if not p.is_file():
        raise StageError(f"{path}: not found")
    out = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise StageError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise StageError(f"{path}:{n}: expected a JSON object")
            answer = row.get("answer", row.get("response"))
            gold = row.get("tests", row.get("gold")) if kind == "code" else row.get("gold")
            if not isinstance(answer, str):
                raise StageError(f"{path}:{n}: answer: expected a string `answer` or `response`")
            if gold is None:
                raise StageError(f"{path}:{n}: gold: missing" + (" (or tests)" if kind == "code" else ""))
            if kind == "code" and not isinstance(gold, (str, list)):
                raise StageError(f"{path}:{n}: tests: expected a list of {{input, output}} or a string of asserts")
            out.append((answer, gold if kind == "code" else str(gold)))
    return out


def _one(job):
    kind, answer, gold, options = job
    from stages.lib.verify import verify

    return verify(kind, answer, gold, **options).row()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.tools.verify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", nargs="?", help="JSONL of {answer or response, gold} (code: gold or tests)")
    ap.add_argument("--kind", choices=("math", "short", "code"), help="which verifier (required)")
    ap.add_argument("--out", help="write the verdicts here (JSONL; default: stdout)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out file")
    ap.add_argument("--mode", choices=("auto", "exact", "numeric"), default="auto",
                    help="short answers: exact or numeric match (auto: numeric when the gold is a number)")
    ap.add_argument("--jobs", type=int, default=1, help="processes to verify in (default 1)")
    ap.add_argument("--cpu-s", type=float, default=2.0, help="code: CPU seconds per test process (default 2)")
    ap.add_argument("--wall-s", type=float, default=5.0, help="code: wall seconds per test process (default 5)")
    ap.add_argument("--memory-mb", type=int, default=512, help="code: address space per process (default 512)")
    a = ap.parse_args(argv)
    if not a.file or not a.kind:
        raise StageError("give a file and --kind math|short|code (see --help)")
    if a.out and not a.force and Path(a.out).exists():
        raise StageError(f"--out: {a.out} exists; pass --force to replace it")
    if a.jobs < 1:
        raise StageError("--jobs: must be >= 1")

    from stages.lib.verify import verifier_id

    rows = read_rows(a.file, a.kind)
    options, named = {}, {}  # what the verifier is given; what of it goes into the identity
    if a.kind == "short":
        options = named = {"mode": a.mode}
    if a.kind == "code":
        from stages.lib.verify.code import Limits

        named = {"cpu_s": a.cpu_s, "wall_s": a.wall_s, "memory_mb": a.memory_mb}
        options = {"limits": Limits(**named)}
    ident = verifier_id(a.kind, **named)
    jobs = [(a.kind, answer, gold, options) for answer, gold in rows]
    if a.jobs > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(a.jobs) as pool:
            verdicts = pool.map(_one, jobs, chunksize=max(1, len(jobs) // (a.jobs * 8)))
    else:
        verdicts = [_one(j) for j in jobs]
    who = json.loads(ident)
    lines = [json.dumps({"row": i, **v, "verifier": who}, ensure_ascii=False) for i, v in enumerate(verdicts)]
    if a.out:
        from stages.lib.io import atomic_file

        with atomic_file(a.out) as f:
            f.write("".join(line + "\n" for line in lines))
    else:
        sys.stdout.write("".join(line + "\n" for line in lines))
    from stages.lib.stats import Stats

    reasons = Stats.tally(v["reason"] for v in verdicts)
    ok = sum(v["ok"] for v in verdicts)
    print(f"verify ({a.kind}): {ok} of {len(verdicts)} accepted"
          + (f" ({100 * ok / len(verdicts):.1f}%)" if verdicts else "")
          + f"; by reason {reasons}" + (f"; verdicts in {a.out}" if a.out else ""),
          file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
