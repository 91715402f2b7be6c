"""What goes into a model call and what comes out (curator's `generic_request` / `generic_response`):
`Sampling`, `Request`, `Completion`, the prompt's two shapes (`chat_messages`, `prompt_text`), the
provenance columns a row takes from its cached record, `TeacherStop` (a fatal endpoint error), and
`split_reasoning`, the one reader of reasoning traces (below).

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
    """The reasoning trace, where the reply carried one (`split_reasoning`); `text` is then the answer
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


# ---------------------------------------------------------------- reasoning traces
# The one normalizer that turns every provider's reply form into (reasoning, answer, source).
#
# `split_reasoning(text, message)` is called wherever an answer is read (`openai_wire.completion_from_body`
# for the online client and the Batch API, `local.generate` for a model on this machine), so a trace is
# never read in a second way. The forms, and where they come from
# (../shared/reference/anchors-distillation-2026.md §1.2):
#
# - `reasoning_content`: `message.reasoning_content` beside `message.content`: DeepSeek's API (deepseek-reasoner);
# - `reasoning`: `message.reasoning` beside `message.content`: vLLM with `--reasoning-parser` since the rename
#   (PR #27752) and the old name's removal (PR #33402, Jan 2026), and OpenRouter;
# - `think_tags`: `<think>trace</think>answer` inline in the content: servers without a reasoning parser (Fireworks);
# - `prefilled_think`: `trace</think>answer`, no opening tag: R1 chat templates that prefill `<think>` (vllm #13125);
# - `none`: no trace found: any other model, or a trace that was lost.
#
# An opening `<think>` that is never closed (the answer budget ran out inside the trace) is `think_tags` with the
# whole rest as reasoning and an empty answer. A field that is present but empty or null counts as absent, so
# content with tags is still read. A trace that was expected but is `none` is counted by the caller
# (`client.CallStats`: `reasoning_missing`), never dropped in silence.
REASONING_SOURCES = ("reasoning_content", "reasoning", "think_tags", "prefilled_think", "none")
REASONING_FIELDS = ("reasoning", "reasoning_content")  # the new name first: vLLM sent both, with the same text
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True, slots=True)
class Trace:
    reasoning: str | None
    """The thinking trace, stripped of its tags and surrounding whitespace (None: no trace)."""
    answer: str
    """What the model answered after the trace (the whole text when there is no trace)."""
    source: str
    """Where the trace came from: one of REASONING_SOURCES."""


def split_reasoning(text: str, message: dict | None = None) -> Trace:
    """The trace and the answer of one reply: `text` is its content (or a completion's text), `message` the chat
    message it came in (for the `reasoning` / `reasoning_content` fields; None for completions and local text).
    A reasoning field that is not a string (nor null) raises TypeError, as a malformed body does."""
    text = text or ""
    if message:
        for name in REASONING_FIELDS:
            value = message.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise TypeError(f"message.{name} must be a string, got {type(value).__name__}")
            if value.strip():
                return Trace(value.strip(), text, "reasoning_content" if name == "reasoning_content" else name)
    start = text.find(THINK_OPEN)
    end = text.find(THINK_CLOSE)
    if start != -1 and (end == -1 or start < end) and not text[:start].strip():
        # <think>trace</think>answer; an unclosed <think> is a trace cut off by the token limit
        body = text[start + len(THINK_OPEN):]
        close = body.find(THINK_CLOSE)
        if close == -1:
            return Trace(body.strip(), "", "think_tags")
        return Trace(body[:close].strip(), body[close + len(THINK_CLOSE):].strip(), "think_tags")
    if end != -1 and (start == -1 or end < start):
        # the template prefilled <think>: the output starts inside the trace
        return Trace(text[:end].strip(), text[end + len(THINK_CLOSE):].strip(), "prefilled_think")
    return Trace(None, text, "none")


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
