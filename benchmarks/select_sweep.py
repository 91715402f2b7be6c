"""A selection threshold sweep on the embedded default: kept count, judge calls and unknown verdicts.

In a scratch copy of the project: seeds, generate (the default alpaca method, `--requests`
requests) and filter once, then the select stage with the embedded SmolLM2 as the AlpaGasus
judge at each `--thresholds` value (the first run rates every row; later runs are served from
the select cache: 0 judge calls), then once with IFD (`--ifd`). Validation loss and win rate
need train and evaluate per point: run the `dvc exp` sweep in docs/selection.md for those.

    nice python benchmarks/select_sweep.py --requests 16 --thresholds 3 4 4.5 5 --ifd
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def stage(repo: Path, name: str) -> float:
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STILLHOUSE_TEACHER_STORE": str(repo / "store")}
    r = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=repo, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"stage {name} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def set_select(repo: Path, **values) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["select"].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16, help="generate.num_requests (default 16)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[3.0, 4.0, 4.5, 5.0])
    ap.add_argument("--ifd", action="store_true", help="also score IFD with the student base model (top half kept)")
    ap.add_argument("--model", default=str(ROOT / "models/teacher"))
    ap.add_argument("--teacher-cache", help="seed generate's teacher cache from this folder (e.g. a method_yield "
                    "alpaca run's), so generate is served from it")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"{args.model}: no teacher model (run `dvc repro teacher_model` first)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="select-sweep-") as d:
        repo = Path(d)
        shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
        shutil.copytree(ROOT / "seeds", repo / "seeds")
        (repo / "models").mkdir()
        (repo / "models/teacher").symlink_to(Path(args.model).resolve())
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["generate"]["num_requests"] = args.requests
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        if args.teacher_cache:
            shutil.copytree(args.teacher_cache, repo / "data/teacher_cache")
        for name in ("seeds", "generate", "filter"):
            stage(repo, name)
        print(f"{'policy':>28} {'rows':>4} {'kept':>4} {'judge calls':>11} {'cached':>6} {'unknown':>7} {'seconds':>7}")
        runs = [{"method": "rating", "policy": {"score": "rating", "threshold": t}} for t in args.thresholds]
        if args.ifd:
            runs.append({"method": "ifd", "policy": {"score": "ifd", "top_fraction": 0.5}})
        for values in runs:
            set_select(repo, **values)
            secs = stage(repo, "select")
            m = json.loads((repo / "metrics/select.json").read_text())
            rows.append({"policy": m["policy"], "seconds": round(secs, 1), **{k: m[k] for k in ("rows", "kept", "cut")},
                         "judge": m["judge"], "scores": m["scores"], "dropped_by_reason": m["dropped_by_reason"]})
            j = m["judge"]
            print(f"{m['policy']:>28} {m['rows']:>4} {m['kept']:>4} {j['calls']:>11} {j['cache_hits']:>6} "
                  f"{j['unknown']:>7} {secs:>7.1f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
