"""Yield of each generate method on the embedded teacher: parsed and kept examples per teacher-minute.

For every method, in a scratch copy of the project (fresh teacher cache, so every request is a
real call): `stages.seeds`, `stages.generate` with `--requests` requests, `stages.filter`, with
the default params otherwise. Teacher time is the time spent in teacher calls (generate's
completion tokens / tokens per second); wall time includes loading the model; CPU time is
the generate process's user + system seconds (steadier than wall time on a shared machine). What counts as a
request differs: alpaca and self_instruct bootstrap send `--requests` list prompts (self_instruct
then 2 calls per kept instruction), evol_instruct evolves the first `--requests` seeds (3 calls
per evolution and round), magpie writes `--requests` conversations (2 calls each).

    nice python benchmarks/method_yield.py --requests 8 --out /tmp/yield.json   # after `dvc repro teacher_model`
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("alpaca", "self_instruct", "evol_instruct", "magpie")


def run_method(method: str, requests: int, model: Path, extra: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"yield-{method}-") as d:
        repo = Path(d)
        shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
        shutil.copytree(ROOT / "seeds", repo / "seeds")
        (repo / "models").mkdir()
        (repo / "models/teacher").symlink_to(model.resolve())
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["generate"].update(method=method, num_requests=requests, **extra)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        # a fresh teacher store too: every request of this run is a real call
        env = {**os.environ, "PYTHONPATH": str(ROOT), "STILLHOUSE_TEACHER_STORE": str(repo / "store")}
        times, cpu = {}, {}
        for stage in ("seeds", "generate", "filter"):
            t, c = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            r = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=repo, env=env,
                               capture_output=True, text=True)
            times[stage] = time.perf_counter() - t
            c2 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[stage] = c2.ru_utime + c2.ru_stime - c.ru_utime - c.ru_stime
            if r.returncode:
                raise SystemExit(f"{method}: stage {stage} failed:\n{r.stderr[-3000:]}")
        g = json.loads((repo / "metrics/generate.json").read_text())
        f = json.loads((repo / "metrics/filter.json").read_text())
    rate = g["completion_tokens_per_s"] or 0
    teacher_s = g["completion_tokens_called"] / rate if rate else times["generate"]
    return {"method": method, "requests_param": requests, "teacher_calls": g["teacher_calls"],
            "cache_hits": g["cache_hits"], "completion_tokens": g["completion_tokens_called"],
            "teacher_s": round(teacher_s, 1),
            "generate_wall_s": round(times["generate"], 1), "generate_cpu_s": round(cpu["generate"], 1),
            "parsed": g["items_parsed"], "dropped": g["items_unparsed"],
            "kept": f["kept"], "filter_rejected": f["dropped_by_reason"],
            "parsed_per_teacher_min": round(g["items_parsed"] / teacher_s * 60, 2) if teacher_s else None,
            "kept_per_teacher_min": round(f["kept"] / teacher_s * 60, 2) if teacher_s else None,
            "kept_per_wall_min": round(f["kept"] / times["generate"] * 60, 2),
            "kept_per_cpu_min": round(f["kept"] / cpu["generate"] * 60, 2) if cpu["generate"] else None,
            "drops_by_reason": g["dropped_by_reason"], "steps": g["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--requests", type=int, default=8, help="generate.num_requests per method (default 8)")
    ap.add_argument("--model", default=str(ROOT / "models/teacher"), help="the materialised teacher")
    ap.add_argument("--evol-rounds", type=int, default=1, help="generate.evol_instruct.rounds (default 1)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args()
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise SystemExit(f"{model}: no teacher model (run `dvc repro teacher_model` first)")
    extra = {"evol_instruct": {"evol_instruct": {"rounds": args.evol_rounds}}}
    rows = []
    print(f"{'method':>14} {'calls':>5} {'teacher s':>9} {'cpu s':>6} {'parsed':>6} {'kept':>5} {'parsed/min':>10} "
          f"{'kept/min':>8} {'kept/cpu-min':>12}")
    for m in args.methods:
        r = run_method(m, args.requests, model, extra.get(m, {}))
        rows.append(r)
        print(f"{m:>14} {r['teacher_calls']:>5} {r['teacher_s']:>9} {r['generate_cpu_s']:>6} {r['parsed']:>6} "
              f"{r['kept']:>5} {r['parsed_per_teacher_min']:>10} {r['kept_per_teacher_min']:>8} "
              f"{r['kept_per_cpu_min']:>12}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
