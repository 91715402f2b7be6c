"""OpenAI Batch API mode (half price): submit uncached requests as batch jobs, collect them later.

One round, run by `generate` before it reads the cache:
1. every batch job recorded in the cache folder (`batches-*.jsonl`) that still holds
   uncached requests is retrieved; a finished job's output lines become cache entries
   (custom_id = the request's cache key), its error lines become failure records;
2. uncached requests that are in no running job (new ones, and failed or expired ones)
   are submitted as new jobs, recorded in the cache folder at once;
3. what is still running is reported, and `generate` stops with a message saying so:
   the next `dvc repro` collects it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from stages.lib.progress import log
from stages.lib.llm.openai_api import completion_from_body, error_message, request_body

RUNNING = {"validating", "in_progress", "finalizing", "cancelling"}


@dataclass
class BatchRound:
    collected: int = 0
    failed: dict = field(default_factory=dict)
    submitted: int = 0
    running: dict = field(default_factory=dict)  # batch id -> status line


def batch_round(client, requests, sampling, cache, prompt_form: str, model: str, on_done, max_per_job: int = 50_000,
                options=None) -> BatchRound:
    """Collect finished jobs into the cache (through `on_done`), submit what is left; see the module doc.

    Each line's body is built by `openai_api.request_body`, as the synchronous client builds it."""
    out = BatchRound()
    by_key = {r.key: r for r in requests}
    waiting = {k for k in by_key if cache.get(k) is None}
    in_running_job: set[str] = set()
    for job in cache.batches:
        keys = set(job["custom_ids"]) & waiting
        if not keys or job["batch_id"] in cache.batches_done:
            continue
        b = client.batches.retrieve(job["batch_id"])
        if b.status in RUNNING:
            counts = b.request_counts
            done = f"{counts.completed}/{counts.total}" if counts else "?"
            out.running[b.id] = f"{b.status}, {done} done"
            in_running_job |= keys
            continue
        for file_id, is_error in ((b.output_file_id, False), (b.error_file_id, True)):
            if not file_id:
                continue
            for line in client.files.content(file_id).text.splitlines():
                if not line.strip():
                    continue
                rec = json.loads(line)
                key = rec.get("custom_id")
                if key not in keys:
                    continue
                resp = rec.get("response") or {}
                if not is_error and resp.get("status_code") == 200:
                    try:
                        on_done(by_key[key], completion_from_body(resp["body"], prompt_form), None)
                        out.collected += 1
                    except (KeyError, IndexError, TypeError, ValueError):
                        reason = "batch:malformed"
                        on_done(by_key[key], None, reason)
                        out.failed[reason] = out.failed.get(reason, 0) + 1
                else:
                    err = rec.get("error") or (resp.get("body") or {}).get("error") or {}
                    reason = "batch:" + ((rec.get("error") or {}).get("code") or f"http_{resp.get('status_code')}")
                    message = error_message({"error": err}) if err else ""
                    on_done(by_key[key], None, f"{reason}: {message}" if message else reason)
                    out.failed[reason] = out.failed.get(reason, 0) + 1
                keys.discard(key)
        for key in keys:  # neither in the output nor in the error file
            reason = f"batch:{b.status}"
            on_done(by_key[key], None, reason)
            out.failed[reason] = out.failed.get(reason, 0) + 1
        cache.batch_done(b.id)
    todo = [by_key[k] for k in by_key if cache.get(k) is None and k not in in_running_job]
    endpoint = "/v1/chat/completions" if prompt_form == "chat" else "/v1/completions"
    for i in range(0, len(todo), max_per_job):
        chunk = todo[i : i + max_per_job]
        lines = [json.dumps({"custom_id": r.key, "method": "POST", "url": endpoint,
                             "body": request_body(model, prompt_form, r.prompt, sampling.max_new_tokens,
                                                  sampling.temperature, sampling.top_p, sampling.stop,
                                                  sampling.seed + r.draw, options)[1]})
                 for r in chunk]
        f = client.files.create(file=("requests.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")
        cache.add_batch({"batch_id": b.id, "input_file_id": f.id, "custom_ids": [r.key for r in chunk],
                         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        out.submitted += len(chunk)
        out.running[b.id] = f"submitted, {len(chunk)} requests"
    for bid, status in out.running.items():
        log(f"teacher batch {bid}: {status}")
    return out
