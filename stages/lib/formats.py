"""Prompt files: Alpaca JSON, ShareGPT JSON (first human turn), JSONL with a prompt field, OpenAI
messages, FastChat `turns` (first turn) or self-instruct `instances` (the first instance's input).

Used by `generate` (response distillation), `ingest` (decontamination) and `evaluate` (eval sets).
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.lib.errors import StageError
from stages.lib.progress import log
from stages.lib.text.clean import MAX_TEXT_CHARS, clean_json, decode, load_json, too_long
from stages.lib.tokens.templates import user_message

PROMPT_FIELDS = ("instruction", "prompt", "question", "text")
ROLE = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant",
        "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}


class Malformed(Exception):
    """One bad record; the caller decides whether it stops the file. `reason`: the drop reason to count."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


def records(path: Path, max_chars: int = MAX_TEXT_CHARS, stats: dict | None = None):
    """(position, record or Malformed) of a JSON array (`[i]`) or a JSONL file (`:line`).

    Text from the wild is repaired (`stages.lib.text.clean`: invalid UTF-8, lone surrogates, NULs)
    and counted in `stats["repaired"]`; a record holding a string over `max_chars` (0: no cap) comes
    as Malformed with reason `too_long`, counted in `stats["too_long"]`."""
    stats = {} if stats is None else stats
    stats.setdefault("repaired", 0)
    stats.setdefault("too_long", 0)
    data = path.read_bytes()

    def checked(rec, bytes_repaired: bool = False):
        fixed = clean_json(rec)
        stats["repaired"] += bytes_repaired or fixed != rec
        why = too_long(fixed, max_chars)
        if why:
            stats["too_long"] += 1
            return Malformed(why, "too_long")
        return fixed

    if path.suffix == ".json":
        text = decode(data)
        if not _is_utf8(data):  # counted once for the file: its bytes cannot be told apart by record
            stats["repaired"] += 1
            log(f"{path}: invalid UTF-8 bytes replaced by U+FFFD")
        try:
            recs = load_json(text)
        except json.JSONDecodeError as e:
            raise StageError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(recs, list):
            raise StageError(f"{path}: expected a JSON array of records")
        yield from ((f"[{i}]", checked(r)) for i, r in enumerate(recs))
        return
    for n, raw in enumerate(data.split(b"\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        if raw.strip():
            try:
                rec = load_json(decode(raw))
            except json.JSONDecodeError as e:
                yield f":{n}", Malformed(f"invalid JSON: {e.msg}")
                continue
            yield f":{n}", checked(rec, not _is_utf8(raw))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_prompts(path: str | Path, limit: int = 0, stats: dict | None = None) -> list[dict]:
    """[{instruction, input, source}] from an Alpaca / ShareGPT JSON array or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: prompt file not found")
    out = []
    for where, _, prompt in prompt_records(path, stats):
        out.append({**prompt, "source": where})
        if limit and len(out) >= limit:
            break
    return out


def prompt_records(path: Path, stats: dict | None = None):
    """(position as `file:line` or `file[i]`, record, {instruction, input}) of each record; a
    malformed record stops with its position, one over the size cap is skipped (logged, counted
    in `stats["too_long"]`)."""
    for pos, rec in records(path, stats=stats):
        if isinstance(rec, Malformed):
            if rec.reason == "too_long":
                log(f"{path}{pos}: skipped, {rec}")
                continue
            raise StageError(f"{path}{pos}: {rec}")
        yield f"{path}{pos}", rec, prompt_of(rec, f"{path}{pos}")


def prompt_of(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise StageError(f"{where}: expected an object")
    if isinstance(rec.get("conversations"), list):  # ShareGPT
        turns = [t for t in rec["conversations"] if isinstance(t, dict) and t.get("from") in ("human", "user")]
        if not turns or not isinstance(turns[0].get("value"), str):
            raise StageError(f"{where}: conversations: no human turn")
        return {"instruction": turns[0]["value"], "input": ""}
    if isinstance(rec.get("messages"), list):  # OpenAI messages
        turns = [m for m in rec["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        if not turns or not isinstance(turns[0].get("content"), str):
            raise StageError(f"{where}: messages: no user message")
        return {"instruction": turns[0]["content"], "input": ""}
    if isinstance(rec.get("turns"), list):  # FastChat question files (Vicuna, MT-bench): the first turn
        if not rec["turns"] or not isinstance(rec["turns"][0], str):
            raise StageError(f"{where}: turns: no first turn")
        return {"instruction": rec["turns"][0], "input": ""}
    for f in PROMPT_FIELDS:
        if isinstance(rec.get(f), str) and rec[f].strip():
            inp = rec.get("input", "")
            if "input" not in rec and isinstance(rec.get("instances"), list) and rec["instances"]:
                inp = rec["instances"][0].get("input", "") if isinstance(rec["instances"][0], dict) else ""
            return {"instruction": rec[f], "input": inp if isinstance(inp, str) else ""}
    raise StageError(f"{where}: none of the fields {PROMPT_FIELDS}, conversations or messages holds a prompt")


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise Malformed(f"{what}: expected a string")
    return value


def to_messages(rec, fmt: str, answers: str | None = None) -> list[tuple[str | None, list[dict]]]:
    """(original id, messages) conversations of one record; raises Malformed."""
    if isinstance(rec, Malformed):
        raise rec
    if not isinstance(rec, dict):
        raise Malformed("expected an object")
    if fmt == "sharegpt":
        turns = rec.get("conversations", rec.get("items"))
        if not isinstance(turns, list):
            raise Malformed("conversations: expected a list")
        msgs = []
        for k, t in enumerate(turns):
            if not isinstance(t, dict) or t.get("from") not in ROLE:
                raise Malformed(f"conversations[{k}].from: expected one of {sorted(ROLE)}")
            msgs.append({"role": ROLE[t["from"]], "content": _text(t.get("value"), f"conversations[{k}].value")})
        return [(rec.get("id"), msgs)]
    if fmt in ("alpaca", "generated"):
        inst = _text(rec.get("instruction"), "instruction")
        inp = _text(rec.get("input") or "", "input")
        return [(rec.get("id"), [{"role": "user", "content": user_message(inst, inp)},
                                 {"role": "assistant", "content": _text(rec.get("output"), "output")}])]
    if fmt == "hc3":
        q = _text(rec.get("question"), "question")
        key = f"{answers}_answers"
        ans = rec.get(key)
        if not isinstance(ans, list) or not all(isinstance(a, str) for a in ans):
            raise Malformed(f"{key}: expected a list of strings")
        base = rec.get("id")
        return [(f"{base}-{k}" if base is not None else None,
                 [{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for k, a in enumerate(ans)]
    if fmt == "messages":
        msgs = rec.get("messages")
        if not isinstance(msgs, list):
            raise Malformed("messages: expected a list")
        out = []
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise Malformed(f"messages[{k}].role: expected system, user or assistant")
            out.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{k}].content")})
        return [(rec.get("id"), out)]
    raise ValueError(fmt)
