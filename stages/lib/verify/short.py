"""Short answers: exact match after normalisation, or numeric match (GSM8K's `#### 18`).

Where the answer is: after the reply's last `####` (GSM8K's own format), else its last `\\boxed{}`, else
after its last "answer is" / "Answer:", else the whole reply. Exact match normalises as SQuAD's
`normalize_answer` does (lower case, no punctuation, no articles, single spaces). Numeric match reads one
number from each side (thousands separators, a currency sign, a percent sign and a trailing period are
dropped; `a/b` is a fraction) and compares them, whole numbers exactly and others to `rel_tol`; on the
reply's side the last number of the extracted answer counts, so "She makes $18 a day." matches 18.
`mode: auto` is numeric when the gold is a number, exact otherwise."""

from __future__ import annotations

import math
import re
import string

from stages.lib.verify import Verdict
from stages.lib.verify.extract import GSM8K_MARK, gold_answer, last_boxed

MODES = ("auto", "exact", "numeric")
_ANSWER_IS = re.compile(r"(?:answer\s*(?:is|:)|answer\s+is\s*:)\s*(.+)", re.I | re.S)
_NUM = re.compile(r"[-+]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?%?|[-+]?\.\d+%?")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def answer_part(reply: str) -> str:
    """The part of a reply that holds its final answer (see the module doc)."""
    reply = reply or ""
    if GSM8K_MARK in reply:
        return reply.rsplit(GSM8K_MARK, 1)[1].strip()
    boxed = last_boxed(reply)
    if boxed is not None:
        return boxed.strip()
    found = list(_ANSWER_IS.finditer(reply))
    if found:
        return found[-1].group(1).strip().splitlines()[0].strip()
    return reply.strip()


def normalise(text: str) -> str:
    """SQuAD's normalize_answer: lower case, punctuation and articles removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def to_number(text: str) -> float | None:
    """One number written alone: `1,234.5`, `$18`, `50%` (as 50), `3/4`, `-2.`; None when `text` is not one."""
    t = text.strip().rstrip(".").strip()
    t = re.sub(r"\\[$%]", lambda m: m.group(0)[1], t).replace("\\!", "").replace("\\,", "")
    m = _NUM.fullmatch(t)
    return _value(m.group(0)) if m else None


def last_number(text: str) -> float | None:
    found = _NUM.findall(text)
    return _value(found[-1]) if found else None


def _value(s: str) -> float | None:
    s = s.replace("$", "").replace(",", "").replace("%", "").replace(" ", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            return float(num) / float(den) if float(den) else None
        return float(s)
    except ValueError:
        return None


def verify_short(answer: str, gold: str, mode: str = "auto", rel_tol: float = 1e-6) -> Verdict:
    """Accept `answer` when its final answer equals `gold` (`mode`: auto, exact or numeric)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    gold_text = gold_answer(gold)
    part = answer_part(answer)
    gold_num = to_number(gold_text)
    if mode == "numeric" or (mode == "auto" and gold_num is not None):
        if gold_num is None:
            return Verdict(False, "bad_gold", part, gold_text, detail={"mode": "numeric"})
        got = last_number(part)
        if got is None:
            return Verdict(False, "no_answer", part, gold_text, detail={"mode": "numeric"})
        # whole numbers exactly (1,450,001 is not 1,450,000), others to rel_tol
        both_whole = got.is_integer() and gold_num.is_integer()
        ok = got == gold_num if both_whole else math.isclose(got, gold_num, rel_tol=rel_tol, abs_tol=1e-9)
        return Verdict(ok, "match" if ok else "mismatch", part, gold_text, detail={"mode": "numeric"})
    if not part:
        return Verdict(False, "no_answer", part, gold_text, detail={"mode": "exact"})
    ok = normalise(part) == normalise(gold_text)
    return Verdict(ok, "match" if ok else "mismatch", part, gold_text, detail={"mode": "exact"})
