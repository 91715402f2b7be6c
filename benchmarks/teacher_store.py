"""What the teacher store (stages/lib/llm/store.py) costs, with the baseline measured in the same run.

Through the full path (`run_requests` against the loopback server in its own process, at zero
latency so the client's own ceiling shows), requests/s with the workspace cache only and with the
store beside it (one write-once file per answer). Then a rerun in a fresh workspace answered
from the store (what an experiment after a failed `dvc exp run --temp` does), against a rerun
answered by the workspace cache.

    python benchmarks/teacher_store.py                    # 3000 requests, concurrency 64
    python benchmarks/teacher_store.py --requests 20000 --store-dir /big/disk/tmp
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.lib.llm.backend import make_backend  # noqa: E402
from stages.lib.llm.cache import ResponseCache, assign_keys  # noqa: E402
from stages.lib.llm.client import run_requests  # noqa: E402
from stages.lib.llm.endpoint import ApiParams  # noqa: E402
from stages.lib.llm.store import TeacherStore  # noqa: E402
from stages.lib.llm.types import Sampling  # noqa: E402

SERVER = ("import sys, time\nfrom tests.support.fake_openai import FakeOpenAI\n"
          "s = FakeOpenAI().start()\nprint(s.base_url, flush=True)\ntime.sleep(1e9)\n")


def timed(reqs, backend, cache, s) -> tuple[float, object]:
    t0 = time.perf_counter()
    _, stats = run_requests(reqs, backend, cache, s)
    return time.perf_counter() - t0, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--store-dir", default=None, help="parent folder of the temporary store (default: the system tmp)")
    args = ap.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "benchmark")
    server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().strip()
        s = Sampling(16, 0.7, 1.0)
        n = args.requests
        backend = make_backend("openai", "bench", "chat", base_url, api=ApiParams(concurrency=args.concurrency,
                                                                                  timeout_s=30))
        rows = []
        with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=args.store_dir) as st:
            for label, tag, store in (("cache only (baseline)", "a", None), ("cache + store", "b", TeacherStore(st))):
                reqs = assign_keys([f"benchmark prompt {tag} {i}" for i in range(n)], "bench", "chat", s)
                dt, stats = timed(reqs, backend, ResponseCache(f"{tmp}/ws-{tag}", store=store), s)
                assert stats.teacher_calls == n, stats
                rows.append((f"paid: {label}", dt))
            reqs = assign_keys([f"benchmark prompt b {i}" for i in range(n)], "bench", "chat", s)
            dt, stats = timed(reqs, backend, ResponseCache(f"{tmp}/ws-b"), s)
            assert stats.cache_hits == n, stats
            rows.append(("rerun: from the workspace cache (baseline)", dt))
            dt, stats = timed(reqs, backend, ResponseCache(f"{tmp}/ws-fresh", store=TeacherStore(st)), s)
            assert stats.cache_hits == n and stats.teacher_calls == 0, stats
            rows.append(("rerun: fresh workspace, from the store", dt))
    finally:
        server.kill()
        server.wait()
    print(f"{'path':<45} {'requests':>8} {'seconds':>8} {'req/s':>9} {'us/req':>8}")
    for label, dt in rows:
        print(f"{label:<45} {n:>8} {dt:>8.2f} {n / dt:>9.1f} {dt / n * 1e6:>8.0f}")


if __name__ == "__main__":
    main()
