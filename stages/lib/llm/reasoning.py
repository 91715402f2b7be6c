"""Reasoning traces: the one normalizer that turns every provider's reply form into (reasoning, answer, source).

`split_reasoning(text, message)` is called wherever an answer is read (`openai_wire.completion_from_body`
for the online client and the Batch API, `local.generate` for a model on this machine), so a trace is
never read in a second way. The forms, and where they come from
(../shared/reference/anchors-distillation-2026.md §1.2):

- `reasoning_content`: `message.reasoning_content` beside `message.content`: DeepSeek's API (deepseek-reasoner);
- `reasoning`: `message.reasoning` beside `message.content`: vLLM with `--reasoning-parser` since the rename
  (PR #27752) and the old name's removal (PR #33402, Jan 2026), and OpenRouter;
- `think_tags`: `<think>trace</think>answer` inline in the content: servers without a reasoning parser (Fireworks);
- `prefilled_think`: `trace</think>answer`, no opening tag: R1 chat templates that prefill `<think>` (vllm #13125);
- `none`: no trace found: any other model, or a trace that was lost.

An opening `<think>` that is never closed (the answer budget ran out inside the trace) is `think_tags` with the
whole rest as reasoning and an empty answer. A field that is present but empty or null counts as absent, so
content with tags is still read. A trace that was expected but is `none` is counted by the caller
(`client.CallStats`: `reasoning_missing`), never dropped in silence.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("reasoning_content", "reasoning", "think_tags", "prefilled_think", "none")
FIELDS = ("reasoning", "reasoning_content")  # the new name first: vLLM sent both for a while, with the same text
OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True, slots=True)
class Trace:
    reasoning: str | None
    """The thinking trace, stripped of its tags and surrounding whitespace (None: no trace)."""
    answer: str
    """What the model answered after the trace (the whole text when there is no trace)."""
    source: str
    """Where the trace came from: one of SOURCES."""


def split_reasoning(text: str, message: dict | None = None) -> Trace:
    """The trace and the answer of one reply: `text` is its content (or a completion's text), `message` the chat
    message it came in (for the `reasoning` / `reasoning_content` fields; None for completions and local text).
    A reasoning field that is not a string (nor null) raises TypeError, as a malformed body does."""
    text = text or ""
    if message:
        for name in FIELDS:
            value = message.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise TypeError(f"message.{name} must be a string, got {type(value).__name__}")
            if value.strip():
                return Trace(value.strip(), text, "reasoning_content" if name == "reasoning_content" else name)
    start = text.find(OPEN)
    end = text.find(CLOSE)
    if start != -1 and (end == -1 or start < end) and not text[:start].strip():
        # <think>trace</think>answer; an unclosed <think> is a trace cut off by the token limit
        body = text[start + len(OPEN):]
        close = body.find(CLOSE)
        if close == -1:
            return Trace(body.strip(), "", "think_tags")
        return Trace(body[:close].strip(), body[close + len(CLOSE):].strip(), "think_tags")
    if end != -1 and (start == -1 or end < start):
        # the template prefilled <think>: the output starts inside the trace
        return Trace(text[:end].strip(), text[end + len(CLOSE):].strip(), "prefilled_think")
    return Trace(None, text, "none")
