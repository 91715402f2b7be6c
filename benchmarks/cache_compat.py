"""Does a teacher store or workspace cache written by older code still serve every answer? Replays each
record's request (teacher identity, form, prompt, sampling, draw, extra fields) through the current
client, over a backend that counts calls, and reports records served, calls made and keys that differ.

    python benchmarks/cache_compat.py --store "$STILLHOUSE_TEACHER_STORE"   # default ~/.cache/stillhouse/teacher
    python benchmarks/cache_compat.py --cache data/teacher_cache data/eval_cache

The store is copied first (a reused answer would be written into it). Records are grouped by
(identity, form, sampling, extra fields) and their prompts asked in draw order, so the n-th repeat
of a prompt gets draw n as it did when it was bought. A record does not hold the extra request fields
(extra_body, a reasoning budget) or an explicit `teacher_id` that went into its key, so such records are
counted in `keys_differ` here; tests/test_cache_compat.py covers them with the requests that bought them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.lib.llm.backend import RunReport  # noqa: E402
from stages.lib.llm.cache import ResponseCache  # noqa: E402
from stages.lib.llm.client import ModelClient  # noqa: E402
from stages.lib.llm.store import RunFiles, TeacherStore  # noqa: E402
from stages.lib.llm.types import Sampling  # noqa: E402


class Counting:
    """A backend that answers nothing and counts what it was asked."""

    prompt_form = "chat"

    def __init__(self, teacher_id: str, fields: dict):
        self.name, self.teacher_id, self.request_fields, self.calls = "replay", teacher_id, fields, 0

    def check(self) -> None:
        pass

    def run(self, requests, sampling, on_done, report: RunReport) -> None:
        self.calls += len(requests)


def records(store: Path | None, caches: list[Path]) -> list[dict]:
    if store is not None:
        return [json.loads(f.read_text()) for f in sorted((store / "v1/responses").rglob("*.json"))]
    return [rec for c in caches for rec in RunFiles(c).read("responses")]


def replay(recs: list[dict], cache: ResponseCache) -> dict:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in recs:
        fields = r.get("fields") or {}
        groups[(r["teacher_id"], r.get("form", "?"), json.dumps(r["sampling"], sort_keys=True),
                json.dumps(fields, sort_keys=True))].append(r)
    served = calls = differ = 0
    for (tid, form, sampling, fields), group in sorted(groups.items()):
        s = json.loads(sampling)
        backend = Counting(tid, json.loads(fields))
        client = ModelClient(lambda f, b=backend: b, cache)
        group.sort(key=lambda r: r["draw"])
        prompts = [r["prompt"] if isinstance(r["prompt"], str) else tuple(r["prompt"]) for r in group]
        got = client.ask(prompts, Sampling(s["max_new_tokens"], s["temperature"], s["top_p"], tuple(s["stop"]),
                                           s["seed"]), form)
        served += sum(g is not None and g["text"] == r["text"] for g, r in zip(got, group))
        differ += sum(g is None or g["key"] != r["key"] for g, r in zip(got, group))
        calls += backend.calls
    return {"records": len(recs), "served": served, "calls": calls, "keys_differ": differ}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path)
    ap.add_argument("--cache", type=Path, nargs="*", default=[])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = None
        if a.store:
            store = Path(tmp) / "store"
            shutil.copytree(a.store, store)
        ws = Path(tmp) / "ws"  # the store alone (an empty workspace over it), or the old caches' files alone
        ws.mkdir()
        for i, src in enumerate(a.cache):
            for f in sorted(src.glob("*.jsonl")):
                shutil.copy(f, ws / f"{f.stem.split('-', 1)[0]}-old{i}-{f.stem.split('-', 1)[1]}.jsonl")
        recs = records(store, [ws])
        cache = ResponseCache(ws, store=TeacherStore(store) if store else None)
        print(json.dumps(replay(recs, cache)))


if __name__ == "__main__":
    main()
