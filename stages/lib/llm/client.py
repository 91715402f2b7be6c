"""The model client: `open_client(endpoint, cache, ...)` returns the `ModelClient` that generate's
teacher, select's judge and evaluate's student, teacher and judge all ask through.

`ModelClient.ask(prompts, sampling, form)` keys each prompt (`cache.assign_keys`), serves what the
cache (or the store) already holds, sends only the misses to the backend (`backend.Backend`: local,
online or Batch API), records each answer the moment it arrives, and returns one cached record per
prompt (None where it failed, or waits in a running Batch job). What the calls did is counted in one
`CallStats` per client, merged round by round.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Callable

from stages.lib.llm.backend import Backend, RunReport, make_backend
from stages.lib.llm.cache import ResponseCache, assign_keys
from stages.lib.llm.endpoint import ApiParams, EndpointParams, Price
from stages.lib.llm.openai_wire import redact
from stages.lib.llm.store import TeacherStore, store_dir
from stages.lib.llm.types import Completion, Request, Sampling
from stages.lib.progress import Progress, log
from stages.lib.stats import Stats


class CallStats:
    """What model calls did: counts in a `Stats` (`requests`, `cache_hits`, `teacher_calls`, `failed`,
    tokens, `seconds`, `finish:<reason>`, `failed:<reason>`, the online client's `api.<name>` and the Batch
    API's `batch.<name>`), and the last words the server said by failure reason and error kind."""

    def __init__(self):
        self.counts = Stats()
        self.failure_messages: dict[str, str] = {}  # failure reason -> the server's last message for it
        self.api_messages: dict[str, str] = {}  # error kind -> the server's last message (retried ones too)
        self.running: dict[str, str] = {}  # Batch job id -> status, for jobs still running

    def merge(self, other: CallStats) -> CallStats:
        self.counts.merge(other.counts)
        self.failure_messages.update(other.failure_messages)
        self.api_messages.update(other.api_messages)
        self.running.update(other.running)
        return self

    def add_report(self, report: RunReport, kind: str) -> None:
        """A backend round's report; `kind`: `api` (online) or `batch`."""
        self.counts.merge(Stats({f"{kind}.{k}": v for k, v in report.counts.items()}))
        self.api_messages.update({k: redact(v) for k, v in report.messages.items()})
        self.running.update(report.running)

    def _group(self, prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in self.counts.items() if k.startswith(prefix) and v}

    requests = property(lambda self: self.counts["requests"])
    cache_hits = property(lambda self: self.counts["cache_hits"])
    teacher_calls = property(lambda self: self.counts["teacher_calls"])
    failed = property(lambda self: self.counts["failed"])
    prompt_tokens = property(lambda self: self.counts["prompt_tokens"])
    completion_tokens = property(lambda self: self.counts["completion_tokens"])
    reasoning_tokens = property(lambda self: self.counts["reasoning_tokens"])
    seconds = property(lambda self: self.counts["seconds"])
    by_finish = property(lambda self: self._group("finish:"))
    by_trace = property(lambda self: self._group("trace:"))
    """Answers returned with a reasoning trace, by where it came from (reasoning_content, reasoning, think_tags,
    prefilled_think); cached ones included, as `by_finish`."""
    reasoning_missing = property(lambda self: self.counts["reasoning_missing"])
    """Answers returned without a trace where one was expected (`expect_reasoning`): counted, never dropped."""
    failed_by_reason = property(lambda self: self._group("failed:"))

    @property
    def api(self) -> dict:
        """The online client's counts: sent, retries, not_sent, errors by kind and their messages."""
        c = self.counts
        return {"sent": c["api.sent"], "retries": c["api.retries"], "not_sent": c["api.not_sent"],
                "errors": self._group("api.error:"), "messages": dict(self.api_messages)}

    @property
    def batch(self) -> dict:
        """The Batch API's counts: collected, submitted, failed by reason, and the jobs still running."""
        c = self.counts
        return {"collected": c["batch.collected"], "submitted": c["batch.submitted"],
                "failed": self._group("batch.failed:"), "running": dict(self.running)}


def record_of(req: Request, comp: Completion, backend: Backend, sampling: dict) -> dict:
    """The cache record of one answer (the API-only fields only when the API sent them)."""
    rec = {
        "key": req.key, "teacher": backend.name, "teacher_id": backend.teacher_id,
        "prompt": req.prompt if isinstance(req.prompt, str) else list(req.prompt),
        "sampling": sampling, "draw": req.draw, "text": comp.text, "finish_reason": comp.finish_reason,
        "prompt_tokens": comp.prompt_tokens, "completion_tokens": comp.completion_tokens,
        "response_id": comp.response_id or f"local-{req.key[:16]}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if getattr(backend, "endpoint", None):  # an online endpoint's answers are served only for it
        rec["endpoint"] = backend.endpoint
    if comp.served_model is not None:
        rec["served_model"] = comp.served_model
    if comp.system_fingerprint is not None:
        rec["system_fingerprint"] = comp.system_fingerprint
    if comp.reasoning_tokens is not None:
        rec["reasoning_tokens"] = comp.reasoning_tokens
    if comp.reasoning is not None:  # the trace, beside the answer in `text` (types.split_reasoning)
        rec["reasoning"] = comp.reasoning
        rec["reasoning_source"] = comp.reasoning_source
    return rec


def reasoning_source(rec: dict) -> str:
    """Where a cached record's trace came from (`none`: it has none; records of earlier versions have none)."""
    return rec.get("reasoning_source") or "none"


def run_requests(requests: list[Request], backend: Backend, cache: ResponseCache, sampling: Sampling,
                 price: Price | None = None, batch_api: bool = False, check: bool = False,
                 stats: CallStats | None = None, declared: bool = False,
                 role: str = "teacher", expect_reasoning: bool = False) -> tuple[list[dict | None], CallStats]:
    """Return the cached record of every request (None where it failed or still waits) and the call stats
    (`stats`, filled as calls finish, so a caller that passes it keeps the counts of a stopped run).

    The backend is called only for requests whose key is not in the cache yet; each answer is written to
    the cache the moment it arrives. With `batch_api`, misses go through the OpenAI Batch API
    (`openai_batch.BatchBackend`); `stats.batch["running"]` then lists the jobs still running. With
    `check`, the backend is checked (URL, key, model) before the first miss is sent. A failure's reason is
    counted by kind (`http_500`); the server's message goes into the failure record and
    `stats.failure_messages`. A fatal error (400/401/403/404) raises `TeacherStop` after what was answered
    is on disk. An online backend is served only answers its own endpoint produced, unless `declared`
    (the keys hold a `teacher_id` the user declared the same for several endpoints). `role` labels the
    progress lines (teacher, student, reference, judge). Every answer returned is counted by where its
    reasoning trace came from (`trace:<source>`); with `expect_reasoning`, an answer without one is counted
    as `reasoning_missing` (and logged), and kept: the caller decides what to do with it.
    """
    st = stats if stats is not None else CallStats()
    n = st.counts
    endpoint = None if declared else getattr(backend, "endpoint", None)
    stored, refused = cache.from_store, dict(cache.refused)
    misses = [r for r in requests if cache.lookup(r, endpoint) is None]
    n.add("requests", len(requests))
    n.add("cache_hits", len(requests) - len(misses))
    refused = {k: v - refused.get(k, 0) for k, v in cache.refused.items() if v - refused.get(k, 0)}
    log(f"{role}: {len(requests)} requests, {len(requests) - len(misses)} cached "
        f"({cache.from_store - stored} from the teacher store), {len(misses)} to call"
        + (f"; cached records not served: {refused}" if refused else ""))

    def extra() -> dict:
        cost = price.cost(n["prompt_tokens"], n["completion_tokens"]) if price else 0.0  # reasoning included
        return {"hits": n["cache_hits"], "failed": n["failed"], "cost": f"${cost:.4f}"}

    bar = Progress(len(misses), role, extra=extra)
    sampling_dict = asdict(sampling)

    def on_done(req: Request, comp: Completion | None, failure: str | None) -> None:
        if comp is None:
            reason, _, message = (failure or "unknown").partition(": ")
            cache.fail(req.key, reason, message or None)
            n.add("failed")
            n.add(f"failed:{reason}")
            if message:
                st.failure_messages[reason] = redact(message)
        else:
            cache.put(record_of(req, comp, backend, sampling_dict), req)
            n.add("teacher_calls")
            n.add("prompt_tokens", comp.prompt_tokens)
            n.add("completion_tokens", comp.completion_tokens)
            n.add("reasoning_tokens", comp.reasoning_tokens or 0)
        bar.update()

    start = time.monotonic()
    runner, report = backend, RunReport()
    try:
        if misses and batch_api:
            from stages.lib.llm.openai_batch import BatchBackend

            runner = BatchBackend(backend, cache.ledger)
        if misses and check:
            runner.check()
        if misses:
            runner.run(misses, sampling, on_done, report)
    finally:
        st.add_report(report, "batch" if batch_api else "api")
        cache.close()
        bar.close()
    cache.check_written()  # a full disk: every answer is in the store (and this round's records); say where
    n.add("seconds", time.monotonic() - start)
    records = [cache.get(r.key) for r in requests]
    missing = 0
    for rec in records:
        if rec is not None:
            n.add(f"finish:{rec['finish_reason']}")
            source = reasoning_source(rec)
            if source != "none":
                n.add(f"trace:{source}")
            elif expect_reasoning:
                missing += 1
    if missing:
        n.add("reasoning_missing", missing)
        log(f"{role}: {missing} of {sum(r is not None for r in records)} answers came without the reasoning trace "
            "that was expected (counted as reasoning_missing; check the server's reasoning parser or field)")
    return records, st


class ModelClient:
    """Several rounds of requests (steps, growing pools) to one endpoint on one cache, with summed stats.

    `backend_for(form)` builds a backend per prompt form on first use (e.g. completion for
    self-instruct's prompts, chat for response distillation). `teacher_id`: an explicit identity for
    the cache keys instead of the backend's (`local:<weights hash>`, `openai:<model>`;
    docs/teacher-cache.md). `endpoint`: the form and system prompt `query` asks with.
    """

    def __init__(self, backend_for: Callable[[str], Backend], cache: ResponseCache, price: Price | None = None,
                 batch_api: bool = False, teacher_id: str | None = None, endpoint: EndpointParams | None = None,
                 role: str = "teacher", expect_reasoning: bool = False):
        self.backend_for, self.cache, self.price, self.batch_api = backend_for, cache, price, batch_api
        self.teacher_id, self.endpoint, self.role = teacher_id, endpoint, role
        self.expect_reasoning = expect_reasoning  # a trace is expected with every answer: count the ones without
        self.backends: dict[str, Backend] = {}
        self.stats = CallStats()
        self.waiting = 0  # requests still in running Batch API jobs

    def ask(self, prompts: list, sampling: Sampling, form: str, role: str | None = None) -> list[dict | None]:
        """The record of each prompt's answer (None: failed or still in a Batch job); `role` labels the progress
        lines (default: the client's)."""
        if not prompts:
            return []
        if form not in self.backends:
            self.backends[form] = self.backend_for(form)
        backend = self.backends[form]
        requests = assign_keys(prompts, f"id:{self.teacher_id}" if self.teacher_id else backend.teacher_id, form,
                               sampling, backend.request_fields)
        st = CallStats()
        try:
            records, _ = run_requests(requests, backend, self.cache, sampling, self.price, self.batch_api, check=True,
                                      stats=st, declared=bool(self.teacher_id), role=role or self.role,
                                      expect_reasoning=self.expect_reasoning)
        finally:
            self.stats.merge(st)
        self.waiting += sum(r is None for r in records) - st.failed
        return records

    def query(self, prompts: list[str], sampling: Sampling) -> list[dict | None]:
        """`ask` in the endpoint's own prompt form, with its system prompt (select's and evaluate's roles)."""
        e = self.endpoint
        return self.ask([e.prompt(x) for x in prompts], sampling, e.prompt_form)

    def metrics(self) -> dict:
        """What the calls did and cost, and what the server said when it refused (generate's metrics keys)."""
        s, price = self.stats, self.price
        api = s.api
        return {
            "requests": s.requests, "cache_hits": s.cache_hits, "teacher_calls": s.teacher_calls, "failed": s.failed,
            "failed_by_reason": s.failed_by_reason, "failure_messages": s.failure_messages,
            "finish_reasons": s.by_finish, "prompt_tokens_called": s.prompt_tokens,
            "completion_tokens_called": s.completion_tokens, "reasoning_tokens_called": s.reasoning_tokens,
            "completion_tokens_per_s": round(s.completion_tokens / s.seconds, 2) if s.seconds else 0.0,
            # completion tokens include reasoning tokens (billed as output, as OpenAI reports them)
            "cost_usd_called": round(price.cost(s.prompt_tokens, s.completion_tokens), 6) if price else 0.0,
            "api_requests_sent": api["sent"], "api_retries": api["retries"], "api_errors": api["errors"],
            "api_error_messages": api["messages"], "api_not_sent": api["not_sent"],
            # only where traces were expected or seen, so the metrics of other runs keep their keys
            **({"reasoning_sources": s.by_trace, "reasoning_missing": s.reasoning_missing}
               if self.expect_reasoning or s.by_trace else {}),
        }


def open_client(endpoint: EndpointParams, cache: ResponseCache | str | os.PathLike, *, store: str | None = None,
                api: ApiParams | None = None, price: Price | None = None, batch_api: bool = False,
                teacher_id: str | None = None, batch_size: int = 8, dtype: str = "float32",
                role: str = "teacher", expect_reasoning: bool = False) -> ModelClient:
    """The client of one endpoint on `cache` (a folder: a `ResponseCache` there, with the teacher store
    `store_dir(store)`). `api`, `price`: the online client's limits and price; `batch_size`, `dtype`: the
    local model's; `role`: the label of its progress lines (teacher, judge, ...); `expect_reasoning`: count
    answers that come without a reasoning trace (`reasoning_missing`)."""
    if not isinstance(cache, ResponseCache):
        cache = ResponseCache(cache, store=TeacherStore(store_dir(store)))
    e = endpoint
    return ModelClient(lambda form: make_backend(e.backend, e.model, form, e.base_url, batch_size, dtype, api, price,
                                                 e.options()),
                       cache, price, batch_api, teacher_id, endpoint, role, expect_reasoning)
