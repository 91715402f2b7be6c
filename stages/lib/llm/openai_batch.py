"""The Batch API backend (half price): submit uncached requests as batch jobs, collect them later.

One round, run by the client when `batch_api` is set:
1. every batch job in the cache's ledger (`cache.BatchLedger`) that still holds uncached requests is
   retrieved; a finished job's output lines become answers (custom_id = the request's cache key),
   its error lines become failures, and the job is marked collected;
2. uncached requests that are in no running job (new ones, and failed or expired ones) are
   submitted as new jobs, recorded in the ledger at once;
3. what is still running is reported (`RunReport.running`), and `generate` stops with a message
   saying so: the next `dvc repro` collects it.
Each line's body is built by `openai_wire.request_body`, as the online client builds it; the files
and batches endpoints are called through the `openai` package.
"""

from __future__ import annotations

import json

from stages.lib.llm.backend import OnDone, RunReport
from stages.lib.llm.cache import BatchLedger
from stages.lib.llm.openai_online import OnlineBackend
from stages.lib.llm.openai_wire import completion_from_body, error_message, redact, request_body
from stages.lib.llm.types import Request, Sampling, TeacherStop
from stages.lib.progress import log
from stages.lib.text.clean import load_json

RUNNING = {"validating", "in_progress", "finalizing", "cancelling"}


def _line(line: str, batch_id: str, lineno: int, report: RunReport) -> dict:
    """One output or error line of a job as a dict; {} for a blank line, and for a malformed one, which is
    logged and counted (`failed:batch:malformed_line`): its request is failed with the job's other unanswered ones.
    A line is `{custom_id: str, response: {status_code, body: {...}} | null, error: {code, message} | null}`
    (https://platform.openai.com/docs/guides/batch); any other shape, or JSON nested too deep, is malformed."""
    if not line.strip():
        return {}
    try:
        rec = load_json(line)
    except ValueError:
        rec = None
    resp = rec.get("response") if isinstance(rec, dict) else None
    if (not isinstance(rec, dict) or not isinstance(rec.get("custom_id"), str) or not isinstance(resp or {}, dict)
            or not isinstance(rec.get("error") or {}, dict) or not isinstance((resp or {}).get("body") or {}, dict)):
        log(f"teacher batch {batch_id}: line {lineno} of its output is not a Batch API result object; skipped")
        report.counts.add("failed:batch:malformed_line")
        return {}
    return rec


def _reason(rec: dict) -> str:
    """The failure reason of an error line: `batch:<error code>`, else `batch:http_<status>`."""
    code = (rec.get("error") or {}).get("code")
    status = (rec.get("response") or {}).get("status_code")
    return "batch:" + (code if isinstance(code, str) and code else f"http_{status if isinstance(status, int) else '?'}")


class BatchBackend:
    """The Batch API for the endpoint of `online` (its model, form, options, key and URL)."""

    def __init__(self, online: OnlineBackend, ledger: BatchLedger, max_per_job: int = 50_000):
        self.online, self.ledger, self.max_per_job = online, ledger, max_per_job
        self.name, self.teacher_id, self.prompt_form = online.name, online.teacher_id, online.prompt_form
        self.request_fields, self.endpoint = online.request_fields, online.endpoint

    def check(self) -> None:
        self.online.check()

    def run(self, requests: list[Request], sampling: Sampling, on_done: OnDone, report: RunReport) -> None:
        """Collect finished jobs (through `on_done`), submit what is left; see the module doc. An error of
        the files or batches endpoints stops the run with the server's words, redacted (`TeacherStop`)."""
        from openai import APIError

        client = self.online.batch_client()
        by_key = {r.key: r for r in requests}
        waiting = set(by_key)  # neither answered nor in a running job: (re)submitted at the end
        try:
            for job in self.ledger.open_jobs():
                keys = set(job["custom_ids"]) & waiting
                if keys:
                    waiting -= self._collect(client, job["batch_id"], keys, by_key, on_done, report)
            self._submit(client, [r for r in requests if r.key in waiting], sampling, report)
        except APIError as e:  # what was collected or submitted before it is on disk already
            raise TeacherStop(f"teacher {self.online.model!r} at {self.online.shown_url}: Batch API "
                              f"{type(e).__name__}: {redact(str(e), self.online._key)}", "batch_api") from None
        for bid, status in report.running.items():
            log(f"teacher batch {bid}: {status}")

    def _collect(self, client, batch_id: str, keys: set[str], by_key: dict, on_done: OnDone, report: RunReport):
        """Answer `keys` from a finished job and return those answered, or note the job running and return
        all `keys` (they are not sent again). A failed key is left to be submitted again."""
        b = client.batches.retrieve(batch_id)
        if b.status in RUNNING:
            counts = b.request_counts
            report.running[b.id] = f"{b.status}, {f'{counts.completed}/{counts.total}' if counts else '?'} done"
            return keys
        answered, ok = set(), set()
        for file_id, is_error in ((b.output_file_id, False), (b.error_file_id, True)):
            if not file_id:
                continue
            for lineno, line in enumerate(client.files.content(file_id).text.split("\n"), 1):  # U+2028 is text
                rec = _line(line, batch_id, lineno, report)
                key = rec.get("custom_id")
                if key not in keys or key in answered:
                    continue
                answered.add(key)
                resp = rec.get("response") or {}
                if not is_error and resp.get("status_code") == 200:
                    try:
                        comp = completion_from_body(resp["body"], self.prompt_form)
                    except (KeyError, IndexError, TypeError, ValueError):
                        self._fail(by_key[key], "batch:malformed", "", on_done, report)
                        continue
                    on_done(by_key[key], comp, None)
                    ok.add(key)
                    report.counts.add("collected")
                else:
                    err = rec.get("error") or (resp.get("body") or {}).get("error") or {}
                    self._fail(by_key[key], _reason(rec), error_message({"error": err}) if err else "", on_done, report)
        for key in [k for k in by_key if k in keys and k not in answered]:  # in neither the output nor the errors
            self._fail(by_key[key], f"batch:{b.status}", "", on_done, report)
        self.ledger.collected(b.id)
        return ok

    @staticmethod
    def _fail(req: Request, reason: str, message: str, on_done: OnDone, report: RunReport) -> None:
        on_done(req, None, f"{reason}: {message}" if message else reason)
        report.counts.add(f"failed:{reason}")

    def _submit(self, client, todo: list[Request], sampling: Sampling, report: RunReport) -> None:
        form, model, options = self.prompt_form, self.online.model, self.online.options
        endpoint = "/v1/chat/completions" if form == "chat" else "/v1/completions"
        for i in range(0, len(todo), self.max_per_job):
            chunk = todo[i : i + self.max_per_job]
            lines = [json.dumps({"custom_id": r.key, "method": "POST", "url": endpoint,
                                 "body": request_body(model, form, r.prompt, sampling.max_new_tokens,
                                                      sampling.temperature, sampling.top_p, sampling.stop,
                                                      sampling.seed + r.draw, options)[1]})
                     for r in chunk]
            f = client.files.create(file=("requests.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
            b = client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")
            self.ledger.add(b.id, f.id, [r.key for r in chunk])
            report.counts.add("submitted", len(chunk))
            report.running[b.id] = f"submitted, {len(chunk)} requests"
