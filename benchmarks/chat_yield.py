"""Yield of every generate method over a chat-only endpoint that replies the way chat models do.

Each method runs with `prompt_form: chat` (generate's own code path: `run_method`, the teacher
session, the cache) against the strict loopback fake (`FakeOpenAI.strict`: chat-only, as OpenAI)
answering with `tests/support/chat_style.py`: preambles, numbering restarted or continued, bullets,
markdown bold and headings, "Input: None", trailing commentary, in a seeded mix. Reported per
method: requests, items parsed and kept, and both per request.

The baseline, measured in the same run on the same replies: the completion-form parsers (what
reading these replies without the chat parsers gives). An item counts as `clean` only when
no numbering, preamble, markdown or commentary is left in it.

    python benchmarks/chat_yield.py                  # 32 requests per method, a markdown table
    python benchmarks/chat_yield.py --requests 64 --json yield.json

The replies are a model of chat-style replies, not a real model's: the table says how well the
parsers undo these styles, not how a given model behaves.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JUNK = re.compile(r"^\s*(\d+\s*[.)]|[-*]\s|Sure|Here|Certainly|Below)|\*\*|Let me know|I hope this|These cover|###",
                  re.M)


def is_clean(*fields) -> bool:
    return all(f is not None and not JUNK.search(f) for f in fields)


def run_one(name: str, generate: dict, base_url: str, seeds: list[dict], cache_dir: Path, prompt_file: Path):
    from stages.generate import GenerateParams, method_inputs, run_method
    from stages.lib.llm.cache import ResponseCache
    from stages.lib.llm.client import open_client
    from stages.lib.llm.endpoint import ApiParams

    p = GenerateParams(teacher={"backend": "openai", "model": "gpt-4o-mini", "base_url": base_url,
                                "prompt_form": "chat"}, prompt_file=str(prompt_file), **generate)
    session = open_client(p.teacher, ResponseCache(cache_dir / name), api=ApiParams(concurrency=8))
    tasks, dropped, steps = run_method(p, session, method_inputs(p, seeds, None))
    return p, session, tasks, dropped, steps


def baseline(cache: dict) -> dict:
    """The completion-form parsers on the same replies: items parsed, and clean."""
    from stages.lib.generation.alpaca import ALPACA_SYSTEM, parse_chat_response, parse_response
    from stages.lib.generation.self_instruct import (
        BOOTSTRAP_SYSTEM,
        CLASSIFY_SYSTEM,
        INSTANCES_SYSTEM,
        parse_classification,
        parse_classification_chat,
        parse_instances,
        parse_instances_chat,
        parse_instructions,
        parse_instructions_chat,
    )

    out: dict = {}

    def add(kind, which, parsed, clean):
        d = out.setdefault(kind, {"replies": 0})
        d[f"{which}_parsed"] = d.get(f"{which}_parsed", 0) + parsed
        d[f"{which}_clean"] = d.get(f"{which}_clean", 0) + clean

    for rec in cache.values():
        system = rec["prompt"][0] if isinstance(rec["prompt"], list) else ""
        text, fin = rec["text"], rec["finish_reason"]
        if system == ALPACA_SYSTEM:
            out.setdefault("alpaca", {"replies": 0})["replies"] += 1
            for which, parse in (("chat", parse_chat_response), ("completion", parse_response)):
                good = [i for i in parse(text, 4, fin) if not i["reason"]]
                add("alpaca", which, len(good), sum(is_clean(i["instruction"], i["input"], i["output"]) for i in good))
        elif system == BOOTSTRAP_SYSTEM:
            out.setdefault("bootstrap", {"replies": 0})["replies"] += 1
            for which, parse in (("chat", parse_instructions_chat), ("completion", parse_instructions)):
                good = [i for i, _ in parse(text, fin) if i]
                add("bootstrap", which, len(good), sum(is_clean(i) for i in good))
        elif system == CLASSIFY_SYSTEM:
            out.setdefault("classify", {"replies": 0})["replies"] += 1
            for which, parse in (("chat", parse_classification_chat), ("completion", parse_classification)):
                got = parse(text) is not None
                add("classify", which, got, got)
        elif system == INSTANCES_SYSTEM:
            out.setdefault("instances", {"replies": 0})["replies"] += 1
            clf = "Class label: ..." in rec["prompt"][1].rsplit("Task:", 1)[-1]
            for which, parse in (("chat", parse_instances_chat), ("completion", parse_instances)):
                good = [i for i, _, _ in parse(text, clf, fin, 5) if i]
                add("instances", which, len(good), sum(is_clean(i["input"], i["output"]) for i in good))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32, help="num_requests per method (default 32)")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    args = ap.parse_args()

    from tests.support.chat_style import chat_style_reply
    from tests.support.fake_openai import FakeOpenAI

    os.environ.setdefault("OPENAI_API_KEY", "loopback-fake-server")  # the fake checks no key unless given one
    seeds = [json.loads(ln) for ln in (ROOT / "seeds/seed_tasks.jsonl").read_text().splitlines() if ln.strip()]
    n = args.requests
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAI.strict(reply=chat_style_reply) as srv:
        tmp = Path(tmp)
        prompts = tmp / "prompts.jsonl"
        rows = ({"instruction": s["instruction"], "input": s["instances"][0]["input"]} for s in seeds[:n])
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
        methods = {
            "alpaca": {"method": "alpaca", "num_requests": n},
            "self_instruct": {"method": "self_instruct", "num_requests": n},
            "responses (bootstrap)": {"method": "responses", "num_requests": n},
            "responses (file, n=2, select judge)": {"method": "responses", "responses": {
                "prompts": str(prompts), "n": 2, "select": "judge"}},
        }
        rows, per_kind = [], {}
        for name, gen in methods.items():
            p, session, tasks, dropped, steps = run_one(name.split()[0] + str(len(rows)), gen, srv.base_url, seeds,
                                                           tmp / "cache", ROOT / "seeds/prompts/generate_prompt.txt")
            st = session.stats
            paths = {r["path"] for r in srv.requests}
            assert "/v1/completions" not in paths, paths
            if p.method == "alpaca":
                parsed_n = steps["alpaca"]["items_parsed"]
            elif p.method == "self_instruct":
                parsed_n = steps["instances"]["instances_parsed"]
            else:
                parsed_n = steps["responses"]["answered"] + steps["responses"]["dropped_by_reason"].get(
                    "not_selected_judge", 0)
            clean = sum(is_clean(t["instruction"], t["input"]) for t in tasks)
            first = p.num_requests if "prompts" not in gen.get("responses", {}) else n
            rows.append({"method": name, "num_requests": first, "requests": st.requests, "failed": st.failed,
                         "items_parsed": parsed_n, "kept_per_num_request": round(len(tasks) / first, 3),
                         "tasks_kept": len(tasks), "clean_kept": clean,
                         "parsed_per_request": round(parsed_n / st.requests, 3) if st.requests else 0,
                         "kept_per_request": round(len(tasks) / st.requests, 3) if st.requests else 0,
                         "steps": steps})
            for kind, d in baseline(session.cache.entries).items():
                agg = per_kind.setdefault(kind, {})
                for k, v in d.items():
                    agg[k] = agg.get(k, 0) + v

    print("| method | num_requests (prompts) | requests, all steps | failed | items parsed | tasks kept | kept, clean "
          "| parsed / request | kept / request | kept / num_requests |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['num_requests']} | {r['requests']} | {r['failed']} | {r['items_parsed']} | "
              f"{r['tasks_kept']} | {r['clean_kept']} | {r['parsed_per_request']} | {r['kept_per_request']} | "
              f"{r['kept_per_num_request']} |")
    print()
    print("| reply kind | replies | chat parsers: parsed (clean) | completion parsers: parsed (clean) |")
    print("|---|---|---|---|")
    for kind, d in per_kind.items():
        print(f"| {kind} | {d['replies']} | {d['chat_parsed']} ({d['chat_clean']}) | "
              f"{d['completion_parsed']} ({d['completion_clean']}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"methods": rows, "baseline": per_kind}, indent=2))


if __name__ == "__main__":
    main()
