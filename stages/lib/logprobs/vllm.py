"""A vLLM endpoint as a source of captured log-probabilities: `prompt_logprobs` on POST /v1/completions.

What the real server does, and this client relies on:
- The request: `{"model", "prompt": [token ids], "max_tokens": 1, "temperature": 0, "prompt_logprobs": k}`.
  `prompt_logprobs` is one of vLLM's extra Completions parameters (docs.vllm.ai, OpenAI-compatible server,
  "Extra parameters"); a prompt of token ids is scored as given, never re-tokenized. `max_tokens` cannot be
  0: SamplingParams refuses it ("max_tokens must be at least 1, got 0.", vllm/sampling_params.py), and
  vllm-project/vllm#9336, which asks for 0 for exactly this use, is open ("the forward pass of the model
  always generates a new token"). So one token is generated and ignored.
- The answer: `choices[0].prompt_logprobs`, one entry per prompt token. The first is null (nothing predicts
  it: vllm/v1/engine/logprobs.py, "logprob of first prompt token is None"); entry j maps token ids (strings,
  as JSON keys) to `{"logprob", "rank", "decoded_token"}`: the top k (ranks 1..k) and the prompt token j
  itself, added when it is not among them (`_make_pos_logprob_dict`), so an entry has k or k+1 keys. The
  top k are taken by log-probability, whatever the extra one.
- The cap: the server's `--max-logprobs` (default 20; -1: none; docs.vllm.ai engine arguments). A larger k
  is refused with HTTP 400 "Requested prompt logprobs of 32, which is greater than max allowed: 20"
  (vllm/v1/engine/input_processor.py, `_validate_logprobs`): fatal, said in one line with the fix.
- `--logprobs-mode` defaults to `raw_logprobs`: the model's own log-softmax, before temperature or any
  sampling processor, i.e. the temperature-1 distribution KD wants.

Why a client of its own, not stages/lib/llm's: that client's requests, cache records and store are text
answers keyed by prompt text (one JSON record each, all read into memory at start); a scored example is k
rows per token of numbers, keyed by token ids. So this small client (aiohttp, a concurrency cap, retries with
back-off on 429/5xx/timeouts, a stop on any other 4xx with the server's words) shares the wire helpers
(`llm.openai_wire`: error messages, redaction, Retry-After, the endpoint's name) and keeps each example's
answer by content in the teacher store (`cache.ScoreCache`, through `capture`), so nothing is paid twice.
"""

from __future__ import annotations

import asyncio
import json
import math
import random

import numpy as np

from stages.lib.errors import StageError
from stages.lib.llm.openai_wire import (
    api_key_from_env,
    classify_status,
    endpoint_of,
    error_message,
    public_url,
    wait_from_headers,
)
from stages.lib.llm.types import TeacherStop
from stages.lib.logprobs.format import trained_positions
from stages.lib.stats import Stats
from stages.lib.tokens.arrays import tokenizer_id


class Malformed(Exception):
    pass


def log1mexp(x: float) -> float:
    """log(1 - e^x) for x <= 0, -inf at x >= 0 (no mass left)."""
    if x >= 0:
        return float("-inf")
    return math.log(-math.expm1(x)) if x > -0.693 else math.log1p(-math.exp(x))


def position_topk(entry, prompt_token: int, k: int) -> tuple[list[int], list[float]]:
    """The k most likely (id, logprob) of one `prompt_logprobs` entry (ties: by rank, then id)."""
    if not isinstance(entry, dict) or str(prompt_token) not in entry:
        raise Malformed("a prompt_logprobs entry without the prompt token")
    try:
        items = sorted((-float(v["logprob"]), int(v.get("rank") or 0), int(t)) for t, v in entry.items())
    except (TypeError, ValueError, KeyError, AttributeError):
        raise Malformed("a prompt_logprobs entry that is not {token id: {logprob, rank}}") from None
    if len(items) < k:
        raise Malformed(f"{len(items)} log-probabilities at a position, asked for {k}")
    return [t for _, _, t in items[:k]], [-nl for nl, _, _ in items[:k]]


def rows_from_prompt_logprobs(entries, ids, mask, k: int):
    """(ids [p, k], logprobs [p, k], log_rest [p]) at an example's trained positions from vLLM's `prompt_logprobs`."""
    if not isinstance(entries, list) or len(entries) != len(ids) or entries[0] is not None:
        raise Malformed("prompt_logprobs is not one entry per prompt token, the first null")
    pos = trained_positions(mask)
    out_ids, out_lp = np.zeros((len(pos), k), np.int64), np.zeros((len(pos), k), np.float32)
    rest = np.zeros(len(pos), np.float32)
    for r, j in enumerate(pos):
        top, lp = position_topk(entries[j], int(ids[j]), k)
        out_ids[r], out_lp[r] = top, lp
        m = max(lp)
        rest[r] = log1mexp(m + math.log(sum(math.exp(x - m) for x in lp)))
    return out_ids, out_lp, rest


class VllmTeacher:
    """A model served by vLLM at `base_url` (e.g. http://localhost:8000/v1). `tokenizer`: the served model's
    tokenizer, a dir or hub id (default: `model`), read here for the identity checks. `teacher_id`: an identity
    declared for the cache keys instead of `vllm:<model>@<endpoint>`. The key, if the server wants one, comes
    from OPENAI_API_KEY."""

    def __init__(self, base_url: str, model: str, tokenizer: str | None = None, teacher_id: str | None = None,
                 concurrency: int = 8, max_attempts: int = 4, timeout_s: float = 120.0, backoff_s: float = 0.5):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer or model)
        self.name, self.model, self.tokenizer_id, self.vocab_size = model, model, tokenizer_id(tok), len(tok)
        self.base_url, self.shown = base_url.rstrip("/"), public_url(base_url)
        self.teacher_id = f"id:{teacher_id}" if teacher_id else f"vllm:{model}@{endpoint_of(base_url)}"
        self.concurrency, self.max_attempts, self.timeout_s, self.backoff_s = (concurrency, max_attempts, timeout_s,
                                                                               backoff_s)
        self._key = api_key_from_env(required=False) or "not-needed"
        self.counts = Stats()  # sent, retries, error:<kind>, prompt_tokens, served:<model>
        self.checked = False

    def topk(self, examples: list, k: int, on_done=None) -> list:
        """Each example scored by one request (at most `concurrency` at once); `on_done(index, rows)` as each
        answer arrives. A fatal error raises TeacherStop, an example out of attempts StageError, after the rest
        of the requests in flight are answered."""
        return asyncio.run(self._run(examples, k, on_done))

    def _session(self):
        import aiohttp

        return aiohttp.ClientSession(headers={"Authorization": f"Bearer {self._key}"},
                                     timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                     connector=aiohttp.TCPConnector(limit=self.concurrency))

    def _fatal(self, status: int, content) -> TeacherStop:
        msg = error_message(content, self._key)
        hint = (" (start vLLM with --max-logprobs at least k, or lower k)" if "max allowed" in msg
                else " (check OPENAI_API_KEY)" if status in (401, 403) else "")
        return TeacherStop(f"teacher {self.model!r} at {self.shown}: HTTP {status}: {msg}{hint}", f"http_{status}")

    async def _check(self, session) -> None:
        """Before the first request: the server answers and serves `model` (GET /models, which vLLM lists)."""
        import aiohttp

        try:
            async with session.get(self.base_url + "/models") as r:
                status, content = r.status, await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise TeacherStop(f"teacher {self.model!r} at {self.shown}: cannot reach the endpoint "
                              f"({type(e).__name__}); check base_url", "connection") from None
        if status != 200:
            raise self._fatal(status, content)
        try:
            served = [m.get("id") for m in json.loads(content).get("data", []) if isinstance(m, dict)]
        except (ValueError, AttributeError):
            served = []
        if self.model not in served:
            raise TeacherStop(f"teacher {self.model!r} at {self.shown}: not served there (it serves {served})",
                              "http_404")
        self.checked = True

    async def _one(self, session, ids, mask, k: int):
        """One example's rows, with retries; raises TeacherStop (fatal) or StageError (out of attempts)."""
        import aiohttp

        body = {"model": self.model, "prompt": [int(t) for t in ids], "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": k}
        reason = "no attempt"
        for attempt in range(self.max_attempts):
            headers = None
            try:
                self.counts.add("sent")
                async with session.post(self.base_url + "/completions", json=body) as r:
                    status, content, headers = r.status, await r.read(), r.headers
                if status == 200:
                    answer = json.loads(content)
                    rows = rows_from_prompt_logprobs(answer["choices"][0].get("prompt_logprobs"), ids, mask, k)
                    self.counts.add("prompt_tokens", int((answer.get("usage") or {}).get("prompt_tokens") or 0))
                    self.counts.add(f"served:{answer.get('model')}")
                    return rows
                kind, retryable, _, message = classify_status(status, content, headers, self._key)
                if not retryable:
                    raise self._fatal(status, content)
                reason = f"{kind}: {message}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                reason = f"connection: {type(e).__name__}"
            except (Malformed, ValueError, KeyError, IndexError, TypeError) as e:
                reason = f"malformed: {e}"
            self.counts.add(f"error:{reason.partition(':')[0]}")
            if attempt < self.max_attempts - 1:
                self.counts.add("retries")
                await asyncio.sleep(wait_from_headers(headers) or random.uniform(0, self.backoff_s * 2**attempt))
        raise StageError(f"teacher {self.model!r} at {self.shown}: an example failed {self.max_attempts} times "
                         f"({reason}); rerun to resume")

    async def _run(self, examples: list, k: int, on_done) -> list:
        out: list = [None] * len(examples)
        sem = asyncio.Semaphore(self.concurrency)
        stop: list[BaseException] = []

        async def task(i: int, session) -> None:
            async with sem:
                if stop:
                    return
                try:
                    out[i] = await self._one(session, *examples[i], k)
                except (TeacherStop, StageError) as e:
                    stop.append(e)
                    return
                if on_done is not None:
                    on_done(i, out[i])

        async with self._session() as session:
            if not self.checked:
                await self._check(session)
            await asyncio.gather(*(task(i, session) for i in range(len(examples))))
        if stop:
            raise stop[0]
        return out
