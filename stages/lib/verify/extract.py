"""Where the answer is in a reply and in a gold solution: GSM8K's `#### 18`, the last `\\boxed{...}`, a
fenced code block. Pure string functions, shared by every verifier."""

from __future__ import annotations

import re

GSM8K_MARK = "####"
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.S)


def gold_answer(gold: str) -> str:
    """The gold final answer: what follows GSM8K's last `####`, else the last boxed answer of a solution,
    else the text itself (MATH-500's `answer` field), stripped."""
    gold = str(gold)
    if GSM8K_MARK in gold:
        return gold.rsplit(GSM8K_MARK, 1)[1].strip()
    boxed = last_boxed(gold)
    return (boxed if boxed is not None else gold).strip()


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None when there is none or
    it is never closed."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            c = text[i]
            if c == "{" and text[i - 1] != "\\":
                depth += 1
            elif c == "}" and text[i - 1] != "\\":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def code_block(text: str, language: str = "python") -> str:
    """The last fenced code block in `language` (or with no language), else the last fenced block of any
    language, else the whole text."""
    blocks = _FENCE.findall(text or "")
    for lang, body in reversed(blocks):
        if lang.lower() in (language, "py" if language == "python" else language, ""):
            return body
    return blocks[-1][1] if blocks else (text or "")
