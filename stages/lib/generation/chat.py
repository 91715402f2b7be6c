"""Reading replies the way chat models write them.

A completion model continues the text it was given; a chat model answers it. Its reply may
open with a preamble ("Sure! Here are 7 more tasks:"), restart or continue the numbering,
wrap labels in markdown (`**Input:**`, `### Example 1`, bullets), fence the whole reply in
``` and end with commentary ("Let me know if you need more!"). These helpers undo that
before a method's own parser runs; the completion-form parsers never see them.
"""

from __future__ import annotations

import re

# a trailing paragraph that talks about the reply instead of being part of it
_COMMENTARY = re.compile(
    r"^\s*(let me know|i hope|hope (this|these|that)|feel free|these (are|tasks|examples|instructions|cover)|"
    r"this (list|set|covers)|each (of these|task|example|instruction)|note\s*:|i('ve| have)|"
    r"if you('d| would| need| want)|"
    r"happy to|would you like|do you want|enjoy|good luck|i can (also )?(provide|write|generate))", re.I)
_RULE = re.compile(r"^\s*(-{3,}|\*{3,}|_{3,})\s*$")


def unmarkdown(text: str) -> str:
    """Markdown a chat model adds, removed line by line: code fences, horizontal rules, heading
    marks, bold and underline markers (`**Input:**` -> `Input:`)."""
    out = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.lstrip().startswith("```") or _RULE.match(line):
            out.append("")
            continue
        line = line.replace("**", "").replace("__", "")
        line = re.sub(r"^(\s*)#{1,6}\s+", r"\1", line)
        out.append(line)
    return "\n".join(out)


def strip_commentary(text: str) -> str:
    """Drop trailing paragraphs (after a blank line) that comment on the reply."""
    paras = re.split(r"\n[ \t]*\n", text.rstrip())
    while len(paras) > 1 and _COMMENTARY.match(paras[-1]):
        paras.pop()
    return "\n\n".join(paras)


def clean(text: str) -> str:
    """`unmarkdown`, then `strip_commentary`."""
    return strip_commentary(unmarkdown(text))
