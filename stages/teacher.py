"""The teacher: backends (local transformers, OpenAI-compatible) behind one content-addressed cache.

Every request gets a key: sha256 over the teacher's identity (model fingerprint or
endpoint + model name), the prompt form, the exact prompt, the sampling params and the
draw number (how many identical requests came before it in this run). A response is
stored under its key in append-only JSONL files in the cache folder (a `persist: true`
DVC output), flushed every few responses with a temp-file-and-rename, so a crash keeps
what was bought and a rerun never pays twice for the same request. API keys come only
from the environment and never enter a key, a record or a log line.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from stages.common import StageError, atomic_file, log, progress
from stages.llm import Completion


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()


@dataclass
class Request:
    prompt: str
    key: str = ""


def request_key(teacher_id: str, prompt_form: str, prompt: str, sampling: Sampling, draw: int) -> str:
    payload = {"teacher": teacher_id, "form": prompt_form, "prompt": prompt, "sampling": asdict(sampling), "draw": draw}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def assign_keys(prompts: list[str], teacher_id: str, prompt_form: str, sampling: Sampling) -> list[Request]:
    """Key each prompt; the n-th repeat of an identical prompt gets draw=n (a new sample)."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        draw = seen.get(p, 0)
        seen[p] = draw + 1
        out.append(Request(p, request_key(teacher_id, prompt_form, p, sampling, draw)))
    return out


class ResponseCache:
    """Append-only response store: `responses-<time>-<pid>-<n>.jsonl` files, never rewritten."""

    def __init__(self, path: str | os.PathLike, flush_every: int = 8):
        self.dir = Path(path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self.entries: dict[str, dict] = {}
        self.pending: list[dict] = []
        self._files = 0
        self._run = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
        for f in sorted(self.dir.glob("responses-*.jsonl")):
            for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    rec = json.loads(line)
                    self.entries[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError):
                    log(f"teacher cache: {f}:{lineno}: unreadable entry skipped")

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, rec: dict) -> None:
        self.entries[rec["key"]] = rec
        self.pending.append(rec)
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        with atomic_file(self.dir / f"responses-{self._run}-{self._files:05d}.jsonl") as f:
            for rec in self.pending:
                f.write(json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n")
        self._files += 1
        self.pending = []


# ---------------------------------------------------------------- backends


class LocalBackend:
    """A transformers model on this machine; prompts are completed in left-padded batches."""

    def __init__(self, model: str, prompt_form: str, dtype: str = "float32", device: str = "auto"):
        from stages.llm import fingerprint, load_model

        self.model, self.tok = load_model(model, dtype, device)
        self.name = model
        self.teacher_id = f"local:{fingerprint(model)}"
        self.prompt_form = prompt_form

    def render(self, prompt: str) -> str:
        if self.prompt_form == "chat":
            msgs = [{"role": "user", "content": prompt}]
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return prompt

    def complete(self, prompts: list[str], sampling: Sampling, seed: int) -> list[Completion]:
        from stages.llm import generate

        return generate(
            self.model,
            self.tok,
            [self.render(p) for p in prompts],
            sampling.max_new_tokens,
            sampling.temperature,
            sampling.top_p,
            seed,
            list(sampling.stop) or None,
            add_special_tokens=self.prompt_form != "chat",
        )


class OpenAIBackend:
    """Any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama).

    `chat` form sends the prompt as one user message to Chat Completions; `completion`
    form sends it to the Completions endpoint. The key is read from OPENAI_API_KEY.
    """

    def __init__(self, model: str, base_url: str | None, prompt_form: str, concurrency: int = 8, max_retries: int = 5):
        from openai import OpenAI

        key = os.environ.get("OPENAI_API_KEY") or ("not-needed" if base_url else None)
        if key is None:
            raise StageError("backend openai: set OPENAI_API_KEY in the environment (never in params.yaml)")
        self.client = OpenAI(api_key=key, base_url=base_url, max_retries=max_retries)
        self.name = model
        self.teacher_id = f"openai:{base_url or 'https://api.openai.com/v1'}:{model}"
        self.prompt_form = prompt_form
        self.concurrency = concurrency

    def _one(self, prompt: str, s: Sampling, seed: int) -> Completion:
        common = dict(model=self.name, temperature=s.temperature, top_p=s.top_p, seed=seed, stop=list(s.stop) or None)
        if self.prompt_form == "chat":
            r = self.client.chat.completions.create(
                messages=[{"role": "user", "content": prompt}], max_tokens=s.max_new_tokens, **common
            )
            c = r.choices[0]
            text = c.message.content or ""
        else:
            r = self.client.completions.create(prompt=prompt, max_tokens=s.max_new_tokens, **common)
            c = r.choices[0]
            text = c.text
        u = r.usage
        comp = Completion(text, c.finish_reason or "stop", u.prompt_tokens if u else 0, u.completion_tokens if u else 0)
        comp.response_id = r.id  # type: ignore[attr-defined]
        return comp

    def complete(self, prompts: list[str], sampling: Sampling, seed: int) -> list[Completion]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda ip: self._one(ip[1], sampling, seed + ip[0]), enumerate(prompts)))


def make_backend(backend: str, model: str, prompt_form: str, base_url: str | None = None, batch_size: int = 8,
                 dtype: str = "float32"):
    """`batch_size` is the local generation batch, or the number of concurrent API calls."""
    if backend == "local":
        return LocalBackend(model, prompt_form, dtype)
    if backend == "openai":
        return OpenAIBackend(model, base_url, prompt_form, concurrency=batch_size)
    raise StageError(f"unknown teacher backend {backend!r} (local or openai)")


# ---------------------------------------------------------------- the loop


@dataclass
class CallStats:
    requests: int = 0
    cache_hits: int = 0
    teacher_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    by_finish: dict = field(default_factory=dict)


def run_requests(
    requests: list[Request], backend, cache: ResponseCache, sampling: Sampling, batch_size: int, seed: int
) -> tuple[list[dict], CallStats]:
    """Return the cached record of every request (in request order) and the call stats.

    The teacher is called only for requests whose key is not in the cache yet.
    """
    stats = CallStats(requests=len(requests))
    misses = [r for r in requests if cache.get(r.key) is None]
    stats.cache_hits = len(requests) - len(misses)
    log(f"teacher: {len(requests)} requests, {stats.cache_hits} cached, {len(misses)} to call")
    start = time.monotonic()
    batches = [misses[i : i + batch_size] for i in range(0, len(misses), batch_size)]
    try:
        for batch in progress(batches, total=len(batches), desc="teacher batches"):
            batch_seed = seed + int(batch[0].key[:8], 16)
            for req, comp in zip(batch, backend.complete([r.prompt for r in batch], sampling, batch_seed)):
                cache.put(
                    {
                        "key": req.key,
                        "teacher": backend.name,
                        "teacher_id": backend.teacher_id,
                        "prompt": req.prompt,
                        "sampling": asdict(sampling),
                        "text": comp.text,
                        "finish_reason": comp.finish_reason,
                        "prompt_tokens": comp.prompt_tokens,
                        "completion_tokens": comp.completion_tokens,
                        "response_id": getattr(comp, "response_id", None) or f"local-{req.key[:16]}",
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                )
                stats.teacher_calls += 1
                stats.prompt_tokens += comp.prompt_tokens
                stats.completion_tokens += comp.completion_tokens
    finally:
        cache.flush()
    stats.seconds = time.monotonic() - start
    records = [cache.get(r.key) for r in requests]
    for rec in records:
        stats.by_finish[rec["finish_reason"]] = stats.by_finish.get(rec["finish_reason"], 0) + 1
    return records, stats
