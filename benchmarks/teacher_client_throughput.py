"""Throughput of the API teacher client against the loopback server, with the bound measured alongside.

For each (concurrency C, latency L) the server answers every request after L seconds, so no
client can beat C / L requests/s; the script reports what the client achieved, as a share of
that bound, through the full path (`run_requests`: async client, pacing, retries, and the
durable cache append for every response). At L = 0 it reports the client's own ceiling on
this machine. The server runs in a separate process, so it does not share the client's GIL.

    python benchmarks/teacher_client_throughput.py                 # C=64, L=100 ms and L=0
    python benchmarks/teacher_client_throughput.py --requests 3000 --cases 64:0.1 128:0.05 64:0
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
from stages.lib.llm.types import Sampling  # noqa: E402

SERVER = ("import sys, time\nfrom tests.support.fake_openai import FakeOpenAI\n"
          "s = FakeOpenAI(latency=float(sys.argv[1])).start()\nprint(s.base_url, flush=True)\ntime.sleep(1e9)\n")


def measure(n: int, concurrency: int, latency: float) -> tuple[float, float]:
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(latency)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().strip()
        os.environ.setdefault("OPENAI_API_KEY", "benchmark")
        s = Sampling(16, 0.7, 1.0)
        reqs = assign_keys([f"benchmark prompt {i}" for i in range(n)], "bench", "chat", s)
        backend = make_backend("openai", "bench", "chat", base_url,
                               api=ApiParams(concurrency=concurrency, timeout_s=30))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            _, stats = run_requests(reqs, backend, ResponseCache(tmp), s)
            dt = time.perf_counter() - t0
        assert stats.teacher_calls == n, stats
        return n / dt, dt
    finally:
        server.kill()
        server.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--cases", nargs="+", default=["64:0.1", "64:0"], help="concurrency:latency_seconds")
    args = ap.parse_args()
    print(f"{'C':>4} {'L (s)':>6} {'requests':>8} {'seconds':>8} {'req/s':>8} {'bound C/L':>10} {'share':>6}")
    for case in args.cases:
        c, lat = case.split(":")
        rate, dt = measure(args.requests, int(c), float(lat))
        bound = int(c) / float(lat) if float(lat) > 0 else float("inf")
        share = f"{rate / bound:.0%}" if float(lat) > 0 else "-"
        print(f"{int(c):>4} {float(lat):>6.3f} {args.requests:>8} {dt:>8.2f} {rate:>8.1f} {bound:>10.1f} {share:>6}",
              flush=True)


if __name__ == "__main__":
    main()
