"""What goes into a model call and what comes out (curator's `generic_request` / `generic_response`):
`Sampling`, `Request`, `Completion`, the prompt's two shapes (`chat_messages`, `prompt_text`), the
provenance columns a row takes from its cached record, and `TeacherStop` (a fatal endpoint error).

Every backend (local, online, Batch) answers with a `Completion` that declares every field it may
carry; an answer never gains an attribute at run time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from stages.lib.errors import StageError


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


@dataclass(slots=True)
class Completion:
    """One answer. Token counts are the server's (`usage`) or the local tokenizer's; OpenAI counts
    reasoning tokens inside `completion_tokens` and bills them as output. Slotted: an answer takes no
    field it does not declare."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int | None = None
    """Hidden reasoning tokens inside `completion_tokens`, as an API reports them (None: not reported, local)."""
    response_id: str | None = None
    """The API's response id (None for a local model: the record gets `local-<key>`)."""
    served_model: str | None = None
    """What an API said it served, e.g. gpt-4o-mini-2024-07-18 for gpt-4o-mini."""
    system_fingerprint: str | None = None
    reasoning: str | None = None
    """The reasoning trace, where the reply carried one (`reasoning.split_reasoning`); `text` is then the answer
    after it. Recorded in the cache record as `reasoning`."""
    reasoning_source: str = "none"
    """Where the trace came from: reasoning_content | reasoning | think_tags | prefilled_think | none."""
    logprobs: Any | None = None
    """Token log-probabilities, where asked for (not recorded yet)."""


class TeacherStop(StageError):
    """A fatal error (400/401/403/404): the run stopped, nothing queued after it was sent."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def chat_messages(prompt) -> list[dict]:
    """A prompt as Chat Completions messages: a string is one user message, a (system, user) pair two."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    system, user = prompt
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def prompt_text(prompt) -> str:
    """A prompt as one string (completion form, hashing): a (system, user) pair joined by a blank line."""
    return prompt if isinstance(prompt, str) else "\n\n".join(p for p in prompt if p)


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
