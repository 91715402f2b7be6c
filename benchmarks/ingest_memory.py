"""`ingest`'s peak memory against corpus size: the streaming reader against an older revision, side by side.

A synthetic ShareGPT corpus is written at each size, from the 500 real ShareGPT conversations in the reference
data (`sharegpt/ShareGPT_V3_filtered_500.json`): conversation i is real conversation i mod 500 with its words
shuffled by a seed of i, so every conversation is distinct (MinHash keeps them) yet has real lengths and
vocabulary. Each (revision, format, size) runs `stages.ingest`'s `main` in a fresh process, in a scratch
workspace holding only a params.yaml (default cleaning: English language ID, exact and MinHash dedupe; no
decontamination), and its peak RSS (`ru_maxrss` of the child) is printed with the file size and the wall time.

    python -m benchmarks.ingest_memory --sizes 10,100,1000 --old 4f6f3af

`--old REV` also runs the code of that revision (a temporary `git worktree`); omit it to run only this tree.
Targets (issue 22): flat in the file size for JSON Lines, at most 2x the file for a single JSON array.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import resource, sys, os
sys.path.insert(0, sys.argv[1])
os.chdir(sys.argv[2])
from stages.ingest import main
main()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def corpus(path: Path, megabytes: int, fmt: str, real: list[dict]) -> int:
    """Write about `megabytes` MB of distinct ShareGPT conversations as JSON Lines or one JSON array."""
    target, size, i = megabytes * 1_000_000, 0, 0
    with path.open("w", encoding="utf-8") as f:
        if fmt == "json":
            f.write("[\n")
        while size < target:
            base = real[i % len(real)]
            rng = random.Random(i)
            turns = []
            for t in base["conversations"]:
                words = t["value"].split()
                rng.shuffle(words)
                turns.append({"from": t["from"], "value": f"{i} " + " ".join(words)})
            line = json.dumps({"id": f"c{i}", "conversations": turns}, ensure_ascii=False)
            if fmt == "json" and i:
                line = ",\n" + line
            elif fmt == "jsonl":
                line += "\n"
            f.write(line)
            size += len(line.encode())
            i += 1
        if fmt == "json":
            f.write("\n]\n")
    return path.stat().st_size


def params(corpus_path: Path) -> str:
    return json.dumps({"ingest": {
        "sources": {"sg": {"format": "sharegpt", "path": str(corpus_path), "licence": "bench"}},
        "mixtures": {"m": {"sg": 1.0}}, "mixture": "m", "decontaminate": []}})


def run(code: Path, work: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(code), str(work)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"ingest failed in {work} ({code}):\n{out.stderr[-2000:]}")
    return int(out.stdout.split()[-1]) // 1024, time.perf_counter() - t0  # KiB -> MiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB, comma-separated")
    ap.add_argument("--formats", default="jsonl,json", help="jsonl, json or both")
    ap.add_argument("--old", help="also run this git revision's ingest (e.g. the commit before streaming)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the reference data folder")
    a = ap.parse_args()
    real = json.loads((Path(a.data) / "sharegpt" / "ShareGPT_V3_filtered_500.json").read_text())
    real = [r for r in real if r.get("conversations")]
    codes = {"this tree": ROOT}
    with tempfile.TemporaryDirectory(prefix="ingest-mem-") as tmp:
        tmp = Path(tmp)
        if a.old:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "old"), a.old],
                           check=True, capture_output=True)
            codes[a.old] = tmp / "old"
        print("| code | format | file MB | peak RSS MiB | RSS / file | wall s |")
        print("|---|---|---|---|---|---|")
        try:
            for fmt in a.formats.split(","):
                for mb in map(int, a.sizes.split(",")):
                    path = tmp / f"corpus.{fmt}"
                    size = corpus(path, mb, fmt, real)
                    for name, code in codes.items():
                        work = tmp / "work"
                        subprocess.run(["rm", "-rf", str(work)], check=True)
                        work.mkdir()
                        (work / "params.yaml").write_text(params(path))
                        rss, wall = run(code, work)
                        print(f"| {name} | {fmt} | {size / 1e6:,.0f} | {rss:,} | {rss / (size / 2**20):.2f} | "
                              f"{wall:,.0f} |", flush=True)
                    path.unlink()
        finally:
            if a.old:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "old")],
                               capture_output=True)


if __name__ == "__main__":
    main()
