"""Alpaca/self-instruct rule filters on one generated task.

Used by the `filter` stage, by self-instruct's bootstrap (its pool takes only tasks that pass
the same rules) and by the data report (the drop reasons, in order).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

REASONS = ["too_short", "too_long", "blacklist", "write_a_program", "punctuation_start", "non_ascii_start",
           "empty_output", "input_equals_output", "too_similar", "near_duplicate"]
"""Every drop reason, in the order the steps apply them (metrics list each one, 0 included)."""

BLACKLIST = [
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
]




@dataclass
class RuleParams:
    """The rule filters' settings: the `filter` section's `min_words`, `max_words` and `blacklist`
    (`FilterParams` extends this; `generate` reads just these keys for self-instruct's bootstrap)."""

    min_words: int = 4
    """Reject instructions with fewer words (Alpaca drops <= 3)."""
    max_words: int = 150
    """Reject instructions with more words (Alpaca: > 150)."""
    blacklist: list[str] = field(default_factory=lambda: list(BLACKLIST))
    """Whole words (case-insensitive) that mark tasks a text-only model cannot do."""


# ---------------------------------------------------------------- rules


def rule_reason(row: dict, p, blacklist_re: re.Pattern | None) -> str | None:
    """The first rule a row breaks, or None. `p`: anything with `min_words` and `max_words`."""
    inst = row["instruction"] or ""
    n = len(inst.split())
    if n < p.min_words:
        return "too_short"
    if n > p.max_words:
        return "too_long"
    if blacklist_re is not None and blacklist_re.search(inst):
        return "blacklist"
    if inst.startswith("Write a program"):
        return "write_a_program"
    if inst[0] in string.punctuation:
        return "punctuation_start"
    if not inst[0].isascii():
        return "non_ascii_start"
    if not (row["output"] or "").strip():
        return "empty_output"
    if (row["input"] or "").strip() and row["input"].strip() == row["output"].strip():
        return "input_equals_output"
    return None


def blacklist_regex(words: list[str]) -> re.Pattern | None:
    if not words:
        return None
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.I)
