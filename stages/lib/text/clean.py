"""Text from the wild, made safe: one repair for every reader of outside text.

Real ShareGPT dumps and API replies hold lone UTF-16 surrogates (`"\\ud800"` in JSON, which
`json.loads` turns into a `str` that cannot be encoded as UTF-8), invalid UTF-8 bytes, NUL
characters and byte-order marks. Every stage that reads such text (ingest's sources and the
prompt and eval files through `stages.lib.formats`, seed files, teacher and judge replies through
the response cache) passes it through these functions, so one bad character never stops a stage:

* invalid UTF-8 bytes become U+FFFD (the replacement character), a leading BOM is dropped;
* a lone surrogate becomes U+FFFD; a surrogate pair left in a `str` is joined into its character;
* NUL characters are removed.

`load_json` is `json.loads` for outside text: a document nested deeper than `MAX_JSON_DEPTH` (a
line of 100,000 `[` raises RecursionError in `json.loads`) is a `JSONDecodeError` like any other bad line.

Oversized records are not cut here: each reader drops them with a reason (`too_long`) that its
stage counts, using `too_long` below.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

REPLACEMENT = "\ufffd"
MAX_TEXT_CHARS = 200_000
"""Default cap on one message, prompt or answer (characters); readers drop longer records as `too_long`."""

_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """`text` with surrogates repaired (pairs joined, lone ones replaced by U+FFFD) and NULs removed."""
    if _SURROGATE.search(text):
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text


MAX_JSON_DEPTH = 100
"""Deepest nesting of arrays and objects a reader takes; deeper is invalid JSON (the recursive cleaners and
checkers that follow would hit Python's recursion limit)."""


def load_json(text: str) -> Any:
    """`json.loads(text)`; nesting deeper than `MAX_JSON_DEPTH` raises `json.JSONDecodeError` (never RecursionError)."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", text, 0) from None
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", text, 0)
    return obj


def json_depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, `[]` is 1), without recursion."""
    deepest, stack = 0, [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, dict)):
            deepest = max(deepest, depth + 1)
            stack += [(v, depth + 1) for v in (node.values() if isinstance(node, dict) else node)]
    return deepest


def decode(data: bytes) -> str:
    """Bytes read from a file or socket as clean text: UTF-8 (BOM dropped), invalid bytes as U+FFFD."""
    return clean_text(data.decode("utf-8-sig", "replace"))


def read_text(path: str | Path) -> str:
    """A whole text file, decoded and cleaned by `decode`."""
    return decode(Path(path).read_bytes())


def clean_json(obj):
    """`obj` (parsed JSON: dicts, lists, strings, numbers) with every string, keys included, cleaned."""
    if isinstance(obj, str):
        return clean_text(obj)
    if isinstance(obj, dict):
        return {clean_text(k) if isinstance(k, str) else k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_json(v) for v in obj]
    return obj


def longest_text(obj) -> int:
    """The length of the longest string anywhere in parsed JSON `obj` (0 when there is none)."""
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, dict):
        return max((longest_text(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return max((longest_text(v) for v in obj), default=0)
    return 0


def too_long(obj, max_chars: int) -> str | None:
    """A drop reason (`too_long: N chars > cap`) when a string in `obj` is over `max_chars` (0: no cap)."""
    n = longest_text(obj) if max_chars else 0
    return f"too_long: a text of {n} chars is over the cap of {max_chars}" if n > max_chars else None
