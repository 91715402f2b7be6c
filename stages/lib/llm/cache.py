"""The teacher cache: request keys, the workspace cache (`ResponseCache`) and its Batch job ledger.

Every request gets a key: sha256 over the teacher's identity (local model fingerprint, the
endpoint's model name and, off OpenAI's own, the endpoint, or an explicit `teacher_id`), the prompt form (so the
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
from dataclasses import asdict
from pathlib import Path

from stages.lib.llm.openai_wire import endpoint_of, online_teacher_id, redact
from stages.lib.llm.store import RunFiles, TeacherStore
from stages.lib.llm.types import Request, Sampling
from stages.lib.stats import Stats
from stages.lib.text.clean import clean_json, clean_text

# ---------------------------------------------------------------- keys


def _digest(payload: dict) -> str:
    # surrogatepass: a key never fails on text that slipped past the cleaning (valid text hashes as before)
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


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
                           identity_key(teacher_id, prompt_form, p, s, draw, fields), prompt_form,
                           sampling.max_new_tokens))
    return out


def _legacy_identity(rec: dict) -> str | None:
    """The identity of a record written before records carried one (found by re-deriving its key).

    Such records were keyed with `openai:<base_url>:<model>`; their identity is the one the same model at
    the same endpoint has now (`openai_wire.online_teacher_id`), so they answer requests to that endpoint."""
    try:
        tid, prompt, sampling, draw = rec["teacher_id"], rec["prompt"], rec["sampling"], rec["draw"]
        for form in ("completion", "chat"):
            if _key(tid, form, prompt, sampling, draw, None) == rec["key"]:
                model = rec.get("teacher")
                if tid.startswith("openai:") and model and tid.endswith(f":{model}"):
                    tid = online_teacher_id(model, endpoint_of(tid[len("openai:"): -len(model) - 1] or None))
                return identity_key(tid, form, prompt, sampling, draw)
    except (KeyError, TypeError, AttributeError):
        pass
    return None


def record_endpoint(rec: dict) -> str | None:
    """The endpoint that produced `rec`: its `endpoint` field; for a record written before records carried
    one, the URL in its legacy `openai:<base_url>:<model>` identity, else OpenAI's own endpoint (an
    `openai:<model>` record answers only requests to api.openai.com: docs/teacher-cache.md). None: the
    local model's (`local:<hash>`) or a declared `teacher_id`'s, which say what produced it themselves."""
    if rec.get("endpoint"):
        return rec["endpoint"]
    tid, model = str(rec.get("teacher_id") or ""), rec.get("teacher")
    if not tid.startswith("openai:"):
        return None
    rest = tid[len("openai:"):]
    if model and rest.endswith(f":{model}") and "://" in rest:
        return endpoint_of(rest[: -len(model) - 1])
    return endpoint_of(None)


def reusable(rec: dict, max_new_tokens: int) -> bool:
    """May a cached answer serve a request that differs only in its token limit?

    Yes when it was asked with this very limit, or when it finished on its own (`stop`) within it;
    an answer cut at its limit (`length`) is asked again under another limit."""
    if (rec.get("sampling") or {}).get("max_new_tokens") == max_new_tokens:
        return True
    return rec.get("finish_reason") == "stop" and int(rec.get("completion_tokens") or 0) <= max_new_tokens


# ---------------------------------------------------------------- the workspace cache


class ResponseCache:
    """Append-only store: one `responses-<time>-<pid>.jsonl` (and `failures-...`) per run, never rewritten.

    With a `store` (`stages.lib.llm.store.TeacherStore`, outside the repository), every response and
    Batch job id is written there too, and a request missing here is looked up there before the
    teacher is called (what is found is copied here). `lookup` also reuses an answer to the same
    request under another `max_new_tokens` (`reusable`), and serves only answers of the endpoint asked
    (`record_endpoint`). `ledger`: the Batch jobs."""

    def __init__(self, path: str | os.PathLike, fsync_every_s: float = 1.0, store: TeacherStore | None = None):
        self.dir = Path(path)
        self.files = RunFiles(self.dir, fsync_every_s, store)
        self.store = store
        self.entries: dict[str, dict] = {rec["key"]: rec for rec in self.files.read("responses")}
        self.failures: dict[str, dict] = {rec["key"]: rec for rec in self.files.read("failures")}
        self._by_identity: dict[str, list[dict]] | None = None  # built on the first miss
        self.ledger = BatchLedger(self.files, store)
        self.from_store = 0  # answers served from the store (and copied here)
        self.refused = Stats()  # records not served: `endpoint` (another endpoint's), `mismatch`

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def lookup(self, req: Request, endpoint: str | None = None) -> dict | None:
        """The answer to `req`: from this cache, else the store, else a reusable answer under another
        token limit (recorded under `req.key`, with `reused_from`). None: ask the teacher.

        `endpoint` (an online backend's `endpoint_of(base_url)`; None for the local model or a declared
        `teacher_id`): only an answer that endpoint produced is served (`record_endpoint`). A record that
        does not answer `req` (its key, prompt or draw differ) is never served. Both are counted in `refused`."""
        rec = self.entries.get(req.key)
        if rec is not None and self._serves(rec, req, endpoint):
            return rec
        if not req.identity:
            return None
        if self.store is not None:
            rec = self.store.get(req.identity, req.key)
            if rec is not None and self._serves(rec, req, endpoint):
                self.from_store += 1
                self._keep(rec)
                self.files.append("responses", rec)
                return rec
        candidates = list(self._identity_index().get(req.identity, []))
        if self.store is not None:
            candidates += self.store.candidates(req.identity)
        usable = [r for r in candidates if r.get("key") != req.key and reusable(r, req.max_new_tokens)
                  and self._serves(r, req, endpoint, reused=True)]
        if not usable:
            return None
        # the same limit first (an old record keyed by URL), then any answer that stopped on its own
        old = min(usable, key=lambda r: ((r.get("sampling") or {}).get("max_new_tokens") != req.max_new_tokens,
                                         r.get("created", ""), r["key"]))
        rec = {**old, "key": req.key, "identity": req.identity, "reused_from": old.get("reused_from", old["key"])}
        self.put(rec)
        return rec

    def _serves(self, rec: dict, req: Request, endpoint: str | None, reused: bool = False) -> bool:
        """Does `rec` answer `req` (same key unless `reused`, same prompt and draw) from `endpoint`?"""
        prompt = req.prompt if isinstance(req.prompt, str) else list(req.prompt)
        if (not reused and rec.get("key") != req.key) or rec.get("prompt") != prompt or rec.get("draw") != req.draw:
            self.refused.add("mismatch")
            return False
        if endpoint is not None and record_endpoint(rec) != endpoint:
            self.refused.add("endpoint")
            return False
        return True

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

    def put(self, rec: dict, req: Request | None = None) -> None:
        """Record an answer (text repaired: see `stages.lib.text.clean`), here and in the store."""
        if req is not None:
            rec = {**rec, "identity": rec.get("identity") or req.identity, "form": rec.get("form") or req.form}
        rec = clean_json(rec)
        self._keep(rec)
        self.files.mirror(TeacherStore.put, rec)  # the store first: a full workspace disk loses no paid answer
        self.files.append("responses", rec)

    def fail(self, key: str, reason: str, message: str | None = None) -> None:
        rec = {"key": key, "reason": clean_text(redact(reason)),
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if message:
            rec["message"] = clean_text(redact(message))  # the server's words (truncated, keys redacted)
        self.failures[key] = rec
        self.files.append("failures", rec)

    def sync(self) -> None:
        self.files.sync()

    def check_written(self) -> None:
        """Stop with one line naming the cache folder when a write to it failed (a full disk)."""
        self.files.check_written()

    def close(self) -> None:
        self.files.close()


class BatchLedger:
    """The Batch API jobs bought for this cache (`batches-*.jsonl`, and the store's `v1/batches/`):
    each is submitted once, then collected once. Jobs bought in a run whose workspace is gone come
    from the store."""

    def __init__(self, files: RunFiles, store: TeacherStore | None = None):
        self._files = files
        self._jobs: list[dict] = []  # {batch_id, input_file_id, custom_ids, created}
        self._done: set[str] = set()
        for rec in files.read("batches"):
            self._done.add(rec["batch_id"]) if rec.get("done") else self._jobs.append(rec)
        if store is not None:
            known = {b["batch_id"] for b in self._jobs} | self._done
            self._jobs += [b for b in store.batches() if b["batch_id"] not in known]

    def open_jobs(self) -> list[dict]:
        """Jobs whose results were not collected yet, in the order they were recorded."""
        return [job for job in self._jobs if job["batch_id"] not in self._done]

    def add(self, batch_id: str, input_file_id: str, custom_ids: list[str]) -> None:
        """Record a submitted job at once: it is money committed."""
        rec = {"batch_id": batch_id, "input_file_id": input_file_id, "custom_ids": custom_ids,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._jobs.append(rec)
        self._files.mirror(TeacherStore.add_batch, rec)
        self._files.append("batches", rec)
        self._files.sync()

    def collected(self, batch_id: str) -> None:
        """The job's results are in the cache: never retrieve it again."""
        self._done.add(batch_id)
        self._files.mirror(TeacherStore.batch_done, batch_id)
        self._files.append("batches", {"batch_id": batch_id, "done": True})
