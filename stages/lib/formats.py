"""Prompt files: Alpaca JSON, ShareGPT JSON (first human turn), JSONL with a prompt field, OpenAI
messages, FastChat `turns` (first turn) or self-instruct `instances` (the first instance's input).

Used by `generate` (response distillation), `ingest` (decontamination) and `evaluate` (eval sets).
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from stages.lib.errors import StageError
from stages.lib.progress import log
from stages.lib.text.clean import MAX_JSON_DEPTH, MAX_TEXT_CHARS, clean_json, decode, json_depth, load_json, too_long
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
    """(position, record or Malformed) of a JSON array (`[i]`) or a JSONL file (`:line`), streamed: memory
    holds one record (and one 1 MiB chunk of a JSON array), never the whole file.

    Text from the wild is repaired (`stages.lib.text.clean`: invalid UTF-8, lone surrogates, NULs)
    and counted in `stats["repaired"]`; a record holding a string over `max_chars` (0: no cap) comes
    as Malformed with reason `too_long`, counted in `stats["too_long"]`. A JSON array that is not valid
    JSON stops with `file:line`, at the first bad record (the records before it have been yielded)."""
    stats = {} if stats is None else stats
    stats.setdefault("repaired", 0)
    stats.setdefault("too_long", 0)

    def checked(rec, bytes_repaired: bool = False):
        fixed = clean_json(rec)
        stats["repaired"] += bytes_repaired or fixed != rec
        why = too_long(fixed, max_chars)
        if why:
            stats["too_long"] += 1
            return Malformed(why, "too_long")
        return fixed

    with path.open("rb") as f:
        if path.suffix == ".json":
            chunks = _TextChunks(f)
            for i, rec in enumerate(_array_items(chunks, path)):
                if isinstance(rec, Malformed):
                    yield f"[{i}]", rec
                else:
                    yield f"[{i}]", checked(rec)
            if chunks.repaired:  # counted once for the file: its bytes cannot be told apart by record
                stats["repaired"] += 1
                log(f"{path}: invalid UTF-8 bytes replaced by U+FFFD")
            return
        for n, raw in enumerate(f, 1):  # binary lines end at b"\n" only: U+2028 may sit inside a JSON string
            if raw.strip():
                try:
                    rec = load_json(decode(raw))
                except json.JSONDecodeError as e:
                    yield f":{n}", Malformed(f"invalid JSON: {e.msg}")
                    continue
                yield f":{n}", checked(rec, not _is_utf8(raw))


CHUNK_BYTES = 1 << 20
"""A JSON array is read in chunks of this many bytes."""


class _TextChunks:
    """A binary file as cleaned text chunks: UTF-8 (a leading BOM dropped), invalid bytes as U+FFFD (then
    `repaired` is True), NULs removed; multi-byte characters split between chunks are joined."""

    def __init__(self, f):
        self.f, self.repaired = f, False
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")

    def read(self) -> str | None:
        """The next chunk of text ("" possible), or None at the end of the file."""
        data = self.f.read(CHUNK_BYTES)
        final = not data
        try:
            text = self.decoder.decode(data, final)
        except UnicodeDecodeError:  # from here on, replace: the pending bytes are decoded again with the chunk
            pending = self.decoder.getstate()[0]
            self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
            self.repaired = True
            text = self.decoder.decode(pending + data, final)
        if final and not text:
            return None
        return text.replace("\x00", "")


_WS = " \t\n\r"
_NUMBER_TAIL = "0123456789.eE+-"
_DECODER = json.JSONDecoder()


def _array_items(chunks: _TextChunks, path: Path):
    """The items of a top-level JSON array, parsed one at a time from `chunks`. A syntax error raises StageError
    with its line; an item nested deeper than MAX_JSON_DEPTH comes as Malformed (its extent is known)."""
    buf, pos, line, eof = "", 0, 1, False

    def more(grow: bool = False) -> bool:
        """Drop the consumed text and read one chunk, or with `grow` until the unparsed text has doubled (an item
        k chunks long is then parsed O(log k) times, not k). False at the end of the file."""
        nonlocal buf, pos, line, eof
        line += buf.count("\n", 0, pos)
        buf, pos = buf[pos:], 0
        target, read = 2 * len(buf) if grow else len(buf) + 1, False
        while not eof and len(buf) < target:
            text = chunks.read()
            if text is None:
                eof = True
            else:
                buf, read = buf + text, True
        return read

    def fail(at: int, msg: str):
        raise StageError(f"{path}:{line + buf.count(chr(10), 0, at)}: invalid JSON: {msg}")

    def next_char() -> str:
        """The next character that is not whitespace ("" at the end of the file), at `buf[pos]`."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _WS:
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not more():
                return ""

    first = next_char()
    if first != "[":
        if not first:
            fail(pos, "Expecting value")
        raise StageError(f"{path}: expected a JSON array of records")
    pos += 1
    if next_char() == "]":
        pos += 1
    else:
        while True:
            next_char()
            while True:
                try:
                    item, end = _DECODER.raw_decode(buf, pos)
                except RecursionError:
                    fail(pos, f"nested deeper than {MAX_JSON_DEPTH} levels")
                except json.JSONDecodeError as e:
                    # an item cut by the chunk's end fails near that end, or as an open string: read on
                    cut = e.pos >= len(buf) - 16 or e.msg.startswith("Unterminated string")
                    at = e.pos - pos  # `more` drops the text before `pos`
                    if cut and more(grow=True):
                        continue
                    fail(pos + at, e.msg)
                else:
                    number = isinstance(item, (int, float)) and not isinstance(item, bool)
                    if number and not buf[end:].strip(_NUMBER_TAIL) and more(grow=True):
                        continue  # "1" of "1.5" or "12": a number may go on in the next chunk
                    break
            pos = end
            too_deep = json_depth(item) >= MAX_JSON_DEPTH  # the array itself is one level
            yield Malformed(f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels") if too_deep else item
            sep = next_char()
            if sep == "]":
                pos += 1
                break
            if sep != ",":
                fail(pos, "Expecting ',' delimiter")
            pos += 1
    if next_char():
        fail(pos, "Extra data")


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
