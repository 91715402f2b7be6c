"""The teacher: backends (local transformers, OpenAI-compatible) behind one content-addressed cache.

Every request gets a key: sha256 over the teacher's identity (local model fingerprint, the
endpoint's model name, or an explicit `teacher_id`; never the URL), the prompt form (so the
exact messages), the exact prompt, every sampling param including the seed, the draw number
(how many identical requests came before it in this run) and any extra request fields
(docs/teacher-cache.md). Each response is appended to this run's `responses-*.jsonl` file in
the cache folder (a `persist: true` DVC output) and flushed as it arrives, and written to the
teacher store outside the repository (`stages/lib/llm/store.py`), which outlives DVC's temporary
experiment workspaces; so a crash, even `kill -9`, or a failed `dvc exp run --temp` loses at
most the requests in flight, and a rerun never pays twice for the same request. An answer cached
under another `max_new_tokens` is reused when it stopped on its own within the new limit.
Requests that ran out of attempts go to `failures-*.jsonl` with their reason and are tried
again by the next run. API keys come only from the environment and never enter a key, a
record or a log line.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from stages.lib.errors import StageError
from stages.lib.progress import Progress, log
from stages.lib.llm.local import Completion
from stages.lib.llm.openai_api import DEFAULT_BASE_URL, RequestOptions, chat_messages, prompt_text
from stages.lib.text.clean import clean_json, clean_text


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    seed: int = 0


@dataclass
class Request:
    prompt: "str | tuple[str, str]"  # a string, or a (system, user) pair for chat form
    key: str = ""
    draw: int = 0
    identity: str = ""
    """The key without the token limit: answers to the same request under another max_new_tokens share it."""
    form: str = ""
    max_new_tokens: int = 0


def _digest(payload: dict) -> str:
    # surrogatepass: a key never fails on text that slipped past the cleaning (valid text hashes as before)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()


def _key(teacher_id: str, prompt_form: str, prompt: str, sampling: dict, draw: int, fields: dict | None) -> str:
    payload = {"teacher": teacher_id, "form": prompt_form, "prompt": prompt, "sampling": sampling, "draw": draw}
    if fields:  # only when set, so keys made without extra request fields are the keys of earlier versions
        payload["fields"] = fields
    return _digest(payload)


def request_key(teacher_id: str, prompt_form: str, prompt: str, sampling: Sampling, draw: int,
                fields: dict | None = None) -> str:
    """The cache key of one request: its teacher identity, form, prompt, every sampling param, draw and
    any extra request `fields` (system prompt, extra body). docs/teacher-cache.md lists what is in it."""
    return _key(teacher_id, prompt_form, prompt, asdict(sampling), draw, fields)


def identity_key(teacher_id: str, prompt_form: str, prompt: str, sampling: dict, draw: int,
                 fields: dict | None = None) -> str:
    """`request_key` without `max_new_tokens`: the same question under any token limit."""
    rest = {k: v for k, v in sampling.items() if k != "max_new_tokens"}
    return _digest({"identity": 1, "teacher": teacher_id, "form": prompt_form, "prompt": prompt, "sampling": rest,
                    "draw": draw, **({"fields": fields} if fields else {})})


def assign_keys(prompts: list[str], teacher_id: str, prompt_form: str, sampling: Sampling,
                fields: dict | None = None) -> list[Request]:
    """Key each prompt; the n-th repeat of an identical prompt gets draw=n (a new sample)."""
    seen: dict[str, int] = {}
    out = []
    s = asdict(sampling)
    for p in prompts:
        draw = seen.get(p, 0)
        seen[p] = draw + 1
        out.append(Request(p, _key(teacher_id, prompt_form, p, s, draw, fields), draw,
                           identity_key(teacher_id, prompt_form, p, s, draw, fields), prompt_form, sampling.max_new_tokens))
    return out


def _legacy_identity(rec: dict) -> str | None:
    """The identity of a record written before records carried one (found by re-deriving its key).

    Such records were keyed with `openai:<base_url>:<model>`; their identity uses `openai:<model>`,
    so they answer requests to the same model at any URL."""
    try:
        tid, prompt, sampling, draw = rec["teacher_id"], rec["prompt"], rec["sampling"], rec["draw"]
        for form in ("completion", "chat"):
            if _key(tid, form, prompt, sampling, draw, None) == rec["key"]:
                model = rec.get("teacher")
                if tid.startswith("openai:") and model and tid.endswith(f":{model}"):
                    tid = f"openai:{model}"
                return identity_key(tid, form, prompt, sampling, draw)
    except (KeyError, TypeError, AttributeError):
        pass
    return None


def reusable(rec: dict, max_new_tokens: int) -> bool:
    """May a cached answer serve a request that differs only in its token limit (or its endpoint URL)?

    Yes when it was asked with this very limit, or when it finished on its own (`stop`) within it;
    an answer cut at its limit (`length`) is asked again under another limit."""
    if (rec.get("sampling") or {}).get("max_new_tokens") == max_new_tokens:
        return True
    return rec.get("finish_reason") == "stop" and int(rec.get("completion_tokens") or 0) <= max_new_tokens


class ResponseCache:
    """Append-only store: one `responses-<time>-<pid>.jsonl` (and `failures-...`) per run, never rewritten.

    With a `store` (`stages.lib.llm.store.TeacherStore`, outside the repository), every response and
    Batch job id is written there too, and a request missing here is looked up there before the
    teacher is called (what is found is copied here). `lookup` also reuses an answer to the same
    request under another `max_new_tokens` or endpoint URL (`reusable`)."""

    def __init__(self, path: str | os.PathLike, fsync_every_s: float = 1.0, store=None):
        self.dir = Path(path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.entries: dict[str, dict] = {}
        self.failures: dict[str, dict] = {}
        self.run = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
        self._files: dict[str, object] = {}
        self._fsync_every_s, self._synced = fsync_every_s, time.monotonic()
        self._by_identity: dict[str, list[dict]] | None = None  # built on the first miss
        self._store_failed = False
        self.batches: list[dict] = []  # Batch API jobs: {batch_id, input_file_id, custom_ids, created}
        self.batches_done: set[str] = set()
        for kind in ("failures", "responses", "batches"):
            for rec in self._read(kind):
                if kind == "batches":
                    self.batches_done.add(rec["batch_id"]) if rec.get("done") else self.batches.append(rec)
                else:
                    (self.failures if kind == "failures" else self.entries)[rec["key"]] = rec
        if store is not None:  # jobs bought in a run whose workspace is gone
            known = {b["batch_id"] for b in self.batches} | self.batches_done
            self.batches += [b for b in store.batches() if b["batch_id"] not in known]

    def _read(self, kind: str):
        for f in sorted(self.dir.glob(f"{kind}-*.jsonl")):
            text = f.read_bytes().decode("utf-8", "replace")
            for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a line
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or not ("key" in rec or "batch_id" in rec):
                        raise ValueError
                except ValueError:  # a line cut short by a crash
                    log(f"teacher cache: {f}:{lineno}: incomplete entry skipped")
                    continue
                yield clean_json(rec)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def lookup(self, req: Request) -> dict | None:
        """The answer to `req`: from this cache, else the store, else a reusable answer under another
        token limit or URL (recorded under `req.key`, with `reused_from`). None: ask the teacher."""
        rec = self.entries.get(req.key)
        if rec is not None or not req.identity:
            return rec
        if self.store is not None:
            rec = self.store.get(req.identity, req.key)
            if rec is not None:
                self._keep(rec)
                self._append("responses", rec)
                return rec
        candidates = list(self._identity_index().get(req.identity, []))
        if self.store is not None:
            candidates += self.store.candidates(req.identity)
        usable = [r for r in candidates if r.get("key") != req.key and reusable(r, req.max_new_tokens)]
        if not usable:
            return None
        # the same limit first (an answer from another URL), then any answer that stopped on its own
        old = min(usable, key=lambda r: ((r.get("sampling") or {}).get("max_new_tokens") != req.max_new_tokens,
                                         r.get("created", ""), r["key"]))
        rec = {**old, "key": req.key, "identity": req.identity, "reused_from": old.get("reused_from", old["key"])}
        self.put(rec)
        return rec

    def _identity_index(self) -> dict[str, list[dict]]:
        if self._by_identity is None:
            self._by_identity = {}
            for rec in self.entries.values():
                ident = rec.get("identity") or _legacy_identity(rec)
                if ident:
                    self._by_identity.setdefault(ident, []).append(rec)
        return self._by_identity

    def _keep(self, rec: dict) -> None:
        self.entries[rec["key"]] = rec
        if self._by_identity is not None and rec.get("identity"):
            self._by_identity.setdefault(rec["identity"], []).append(rec)

    def _append(self, kind: str, rec: dict) -> None:
        f = self._files.get(kind)
        if f is None:
            f = self._files[kind] = open(self.dir / f"{kind}-{self.run}.jsonl", "a", encoding="utf-8")
        f.write(json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n")
        f.flush()  # in the OS now: survives the process being killed
        if time.monotonic() - self._synced > self._fsync_every_s:
            self.sync()

    def _to_store(self, method: str, *args) -> None:
        """Write to the store; a failing store is reported once and never loses the answer (it is here)."""
        if self.store is None:
            return
        try:
            getattr(self.store, method)(*args)
        except OSError as e:
            if not self._store_failed:
                log(f"teacher store {self.store.root}: cannot write ({e}); answers are kept in {self.dir} only")
            self._store_failed = True

    def put(self, rec: dict, req: Request | None = None) -> None:
        """Record an answer (text repaired: see `stages.lib.text.clean`), here and in the store."""
        if req is not None:
            rec = {**rec, "identity": rec.get("identity") or req.identity, "form": rec.get("form") or req.form}
        rec = clean_json(rec)
        self._keep(rec)
        self._append("responses", rec)
        self._to_store("put", rec)

    def fail(self, key: str, reason: str, message: str | None = None) -> None:
        rec = {"key": key, "reason": clean_text(reason), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if message:
            rec["message"] = clean_text(message)  # the server's words (truncated, keys redacted)
        self.failures[key] = rec
        self._append("failures", rec)

    def add_batch(self, rec: dict) -> None:
        self.batches.append(rec)
        self._append("batches", rec)
        self.sync()  # a submitted job is money committed: make its record durable now
        self._to_store("add_batch", rec)

    def batch_done(self, batch_id: str) -> None:
        self.batches_done.add(batch_id)
        self._append("batches", {"batch_id": batch_id, "done": True})
        self._to_store("batch_done", batch_id)

    def sync(self) -> None:
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        self.sync()
        for f in self._files.values():
            f.close()
        self._files = {}


# ---------------------------------------------------------------- backends

OnDone = Callable[[Request, "Completion | None", "str | None"], None]


class LocalBackend:
    """A transformers model on this machine; prompts are completed in left-padded batches."""

    kind = "local"

    def __init__(self, model: str, prompt_form: str, dtype: str = "float32", batch_size: int = 8, device: str = "auto"):
        from stages.lib.llm.local import fingerprint

        self._load_args, self._loaded = (model, dtype, device), None
        self.name = model
        self.teacher_id = f"local:{fingerprint(model)}"
        self.prompt_form = prompt_form
        self.batch_size = batch_size

    @property
    def model(self):
        return self._load()[0]

    @property
    def tok(self):
        return self._load()[1]

    def _load(self):
        """The model is loaded on first use: a run served from the cache never loads it."""
        if self._loaded is None:
            from stages.lib.llm.local import load_model

            self._loaded = load_model(*self._load_args)
        return self._loaded

    def render(self, prompt) -> str:
        if self.prompt_form == "chat":
            return self.tok.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)
        return prompt_text(prompt)

    def complete(self, prompts: list[str], sampling: Sampling, seed: int) -> list[Completion]:
        from stages.lib.llm.local import generate

        return generate(self.model, self.tok, [self.render(p) for p in prompts], sampling.max_new_tokens,
                        sampling.temperature, sampling.top_p, seed, list(sampling.stop) or None,
                        add_special_tokens=self.prompt_form != "chat")

    def run_all(self, requests: list[Request], sampling: Sampling, on_done: OnDone) -> dict:
        for i in range(0, len(requests), self.batch_size):
            batch = requests[i : i + self.batch_size]
            for req, comp in zip(batch, self.complete([r.prompt for r in batch], sampling,
                                                      sampling.seed + int(batch[0].key[:8], 16))):
                on_done(req, comp, None)
        return {}


class OpenAIBackend:
    """Any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama), through `ApiTeacher`.

    `chat` form sends the prompt as messages (a user message, after a system message when the
    prompt is a (system, user) pair) to Chat Completions; `completion` form sends it to the
    Completions endpoint. `options` (RequestOptions): model family, extra body fields. The key
    is read from OPENAI_API_KEY.
    """

    kind = "openai"

    def __init__(self, model: str, base_url: str | None, prompt_form: str, limits=None, price=None, options=None):
        from stages.lib.llm.openai_api import ApiLimits, ApiTeacher

        key = os.environ.get("OPENAI_API_KEY") or ("not-needed" if base_url else None)
        if key is None:
            raise StageError("backend openai: set OPENAI_API_KEY in the environment (never in params.yaml)")
        self.name = model
        self.options = options or RequestOptions()
        self.teacher_id = f"openai:{model}"  # not the URL: the same model behind another host or proxy
        self.request_fields = self.options.fields(model)  # extra body, reasoning budget: in the key when set
        self.prompt_form = prompt_form
        self.api = ApiTeacher(model, base_url, prompt_form, key, limits or ApiLimits(), price, self.options)
        self._key, self._base_url = key, base_url

    def check_endpoint(self) -> None:
        """A cheap check of URL, key and model before the first paid request (see ApiTeacher.check_endpoint)."""
        self.api.check_endpoint()

    def batch_client(self):
        """A synchronous client for the Batch API (files and batches endpoints)."""
        from openai import OpenAI

        return OpenAI(api_key=self._key, base_url=self._base_url or DEFAULT_BASE_URL, max_retries=5)

    def run_all(self, requests: list[Request], sampling: Sampling, on_done: OnDone) -> dict:
        stats = self.api.run(requests, sampling, [sampling.seed + r.draw for r in requests], on_done)
        return asdict(stats)


def make_backend(backend: str, model: str, prompt_form: str, base_url: str | None = None, batch_size: int = 8,
                 dtype: str = "float32", limits=None, price=None, options=None):
    """`batch_size`: the local generation batch. `limits`/`price`/`options`: the API client's
    (ApiLimits, Price, RequestOptions)."""
    if backend == "local":
        return LocalBackend(model, prompt_form, dtype, batch_size)
    if backend == "openai":
        return OpenAIBackend(model, base_url, prompt_form, limits, price, options)
    raise StageError(f"unknown teacher backend {backend!r} (local or openai)")


# ---------------------------------------------------------------- the loop


@dataclass
class CallStats:
    requests: int = 0
    cache_hits: int = 0
    teacher_calls: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    seconds: float = 0.0
    by_finish: dict = field(default_factory=dict)
    failed_by_reason: dict = field(default_factory=dict)
    failure_messages: dict = field(default_factory=dict)  # reason -> the server's last message for it
    api: dict = field(default_factory=dict)
    batch: dict = field(default_factory=dict)


def run_requests(requests: list[Request], backend, cache: ResponseCache, sampling: Sampling,
                 price=None, batch_api: bool = False, check: bool = False) -> tuple[list[dict | None], CallStats]:
    """Return the cached record of every request (None where it failed or still waits) and the call stats.

    The teacher is called only for requests whose key is not in the cache yet; each
    response is written to the cache the moment it arrives. With `batch_api`, misses go
    through the OpenAI Batch API instead (`stages/openai_batch.py`); `stats.batch["running"]`
    then lists the jobs still running. With `check`, the endpoint is checked (URL, key, model)
    before the first miss is sent. A failure's reason is counted by kind (`http_500`); the
    server's message goes into the failure record and `stats.failure_messages`. A fatal
    error (400/401/403/404) raises `TeacherStop` after what was answered is on disk.
    """
    stats = CallStats(requests=len(requests))
    misses = [r for r in requests if cache.lookup(r) is None]
    stats.cache_hits = len(requests) - len(misses)
    log(f"teacher: {len(requests)} requests, {stats.cache_hits} cached, {len(misses)} to call")
    def extra() -> dict:
        cost = price.cost(stats.prompt_tokens, stats.completion_tokens) if price else 0.0  # reasoning included
        return {"hits": stats.cache_hits, "failed": stats.failed, "cost": f"${cost:.4f}"}

    bar = Progress(len(misses), "teacher", extra=extra)
    sampling_dict = asdict(sampling)

    def on_done(req: Request, comp: Completion | None, failure: str | None) -> None:
        if comp is None:
            reason, _, message = (failure or "unknown").partition(": ")
            cache.fail(req.key, reason, message or None)
            stats.failed += 1
            stats.failed_by_reason[reason] = stats.failed_by_reason.get(reason, 0) + 1
            if message:
                stats.failure_messages[reason] = message
        else:
            rec = {
                "key": req.key, "teacher": backend.name, "teacher_id": backend.teacher_id,
                "prompt": req.prompt if isinstance(req.prompt, str) else list(req.prompt),
                "sampling": sampling_dict, "draw": req.draw, "text": comp.text, "finish_reason": comp.finish_reason,
                "prompt_tokens": comp.prompt_tokens, "completion_tokens": comp.completion_tokens,
                "response_id": getattr(comp, "response_id", None) or f"local-{req.key[:16]}",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            for name in ("served_model", "system_fingerprint", "reasoning_tokens"):  # API answers only
                if getattr(comp, name, None) is not None:
                    rec[name] = getattr(comp, name)
            cache.put(rec, req)
            stats.teacher_calls += 1
            stats.prompt_tokens += comp.prompt_tokens
            stats.completion_tokens += comp.completion_tokens
            stats.reasoning_tokens += getattr(comp, "reasoning_tokens", 0) or 0
        bar.update()

    start = time.monotonic()
    try:
        if misses and check and hasattr(backend, "check_endpoint"):
            backend.check_endpoint()
        if misses and batch_api:
            from stages.lib.llm.openai_batch import batch_round

            rnd = batch_round(backend.batch_client(), misses, sampling, cache, backend.prompt_form, backend.name, on_done,
                              options=backend.options)
            stats.batch = asdict(rnd)
        elif misses:
            stats.api = backend.run_all(misses, sampling, on_done) or {}
    finally:
        cache.close()
        bar.close()
    stats.seconds = time.monotonic() - start
    records = [cache.get(r.key) for r in requests]
    for rec in records:
        if rec is not None:
            stats.by_finish[rec["finish_reason"]] = stats.by_finish.get(rec["finish_reason"], 0) + 1
    return records, stats


def provenance(rec: dict) -> dict:
    """The provenance columns every generated row carries, from its cached teacher record.

    `served_model` and `system_fingerprint` are what an API said it served (e.g.
    gpt-4o-mini-2024-07-18 for gpt-4o-mini); None for a local teacher.
    """
    prompt = rec["prompt"] if isinstance(rec["prompt"], str) else json.dumps(rec["prompt"], ensure_ascii=False)
    return {"prompt_hash": hashlib.sha256(prompt.encode()).hexdigest()[:16], "cache_key": rec["key"],
            "response_id": rec["response_id"], "teacher_model": rec["teacher"],
            "sampling": json.dumps(rec["sampling"], sort_keys=True), "finish_reason": rec["finish_reason"],
            "served_model": rec.get("served_model"), "system_fingerprint": rec.get("system_fingerprint")}


class TeacherSession:
    """Several rounds of requests (steps, growing pools) on one cache, with summed stats.

    `backend_for(form)` builds a backend per prompt form on first use (e.g. completion for
    self-instruct's prompts, chat for response distillation).
    """

    def __init__(self, backend_for: Callable[[str], object], cache: ResponseCache, price=None, batch_api: bool = False,
                 teacher_id: str | None = None):
        """`teacher_id`: an explicit teacher identity for the cache keys instead of the backend's
        (`local:<weights hash>`, `openai:<model>`); see docs/teacher-cache.md."""
        self.backend_for, self.cache, self.price, self.batch_api = backend_for, cache, price, batch_api
        self.teacher_id = teacher_id
        self.backends: dict[str, object] = {}
        self.stats = CallStats()
        self.waiting = 0  # requests still in running Batch API jobs

    def ask(self, prompts: list[str], sampling: Sampling, form: str) -> list[dict | None]:
        if not prompts:
            return []
        if form not in self.backends:
            self.backends[form] = self.backend_for(form)
        backend = self.backends[form]
        requests = assign_keys(prompts, f"id:{self.teacher_id}" if self.teacher_id else backend.teacher_id, form,
                               sampling, getattr(backend, "request_fields", None))
        try:
            records, st = run_requests(requests, backend, self.cache, sampling, self.price, self.batch_api, check=True)
        finally:
            self._add_api(getattr(getattr(backend, "api", None), "stats", None))
        s = self.stats
        for name in ("requests", "cache_hits", "teacher_calls", "failed", "prompt_tokens", "completion_tokens",
                     "reasoning_tokens", "seconds"):
            setattr(s, name, getattr(s, name) + getattr(st, name))
        s.failure_messages.update(st.failure_messages)
        for name in ("by_finish", "failed_by_reason"):
            for k, v in getattr(st, name).items():
                getattr(s, name)[k] = getattr(s, name).get(k, 0) + v
        for k, v in st.batch.items():
            if k == "running":
                s.batch.setdefault("running", {}).update(v)
            elif isinstance(v, (int, float)):
                s.batch[k] = s.batch.get(k, 0) + v
        self.waiting += sum(r is None for r in records) - st.failed
        return records

    def _add_api(self, api_stats) -> None:
        """Add what an API client did in one round (its stats are per round: a fresh ApiStats each time)."""
        from stages.lib.llm.openai_api import ApiStats

        if api_stats is None:
            return
        for k, v in asdict(api_stats).items():
            if k == "messages":
                self.stats.api.setdefault(k, {}).update(v)
            elif isinstance(v, (int, float)):
                self.stats.api[k] = self.stats.api.get(k, 0) + v
            elif isinstance(v, dict):
                for kk, vv in v.items():
                    self.stats.api.setdefault(k, {})[kk] = self.stats.api.get(k, {}).get(kk, 0) + vv
        api_stats.__dict__.update(asdict(ApiStats()))
