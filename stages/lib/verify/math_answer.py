"""Math answers with Hugging Face's Math-Verify (`math-verify`, pinned in pyproject.toml): the gold answer and
the reply are each parsed to SymPy (LaTeX or plain expressions; the reply's last `\\boxed{}` or `#### n`
first) and compared by value, so `\\frac{1}{2}`, `0.5` and `1/2` are one answer, as are `\\left( 3, \\frac{\\pi}{2}
\\right)` and `(3, \\pi/2)`.

Math-Verify's LaTeX parser (ANTLR's Python runtime) takes 15-60 ms an answer, so two exact shortcuts come
first, both decided without it: the same LaTeX up to notation (spaces, `\\left`/`\\right`, `\\dfrac`, thin
spaces, `^\\circ`, a final period) is a match; two plain numbers (integers, decimals, `a/b`, `\\frac{a}{b}`,
thousands separators) are compared as exact fractions, a decimal to `float_rounding` places as Math-Verify
does. Everything else goes to Math-Verify, and a gold answer is parsed once per process (`parse_gold` is
cached). `Verdict.detail["path"]` says which decided: `same_latex`, `numbers` or `math_verify`.

Math-Verify's timeouts use `signal.alarm`, which works only in the main thread: elsewhere they are off (the
caller then bounds the time itself)."""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from functools import lru_cache

from stages.lib.verify import Verdict
from stages.lib.verify.extract import GSM8K_MARK, gold_answer, last_boxed

TIMEOUT_S = 5
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_NOTATION = [(re.compile(p), r) for p, r in (
    (r"\\(?:left|right)(?![a-zA-Z])\s*", ""), (r"\\[dt]frac", r"\\frac"), (r"\\[!,;:> ]|~", ""),
    (r"\^\s*\{?\\circ\}?", ""),
    (r"\\displaystyle", ""), (r"^\$+|\$+$", ""), (r"\.\s*$", ""),
)]
_COMMAND_END = re.compile(r"\\[a-zA-Z]+$")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)$")
_SLASH = re.compile(r"^([-+]?\d+)/(\d+)$")
_FRAC = re.compile(r"^([-+]?)\\frac(?:\{([-+]?\d+)\}|(\d))(?:\{(\d+)\}|(\d))$")  # \frac123 is (1/2)3


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def notation(latex: str) -> str:
    """`latex` without what only changes how it looks: spaces, sizing, `\\dfrac`, degree marks, a final period."""
    for pattern, repl in _NOTATION:
        latex = pattern.sub(repl, latex)
    out = ""
    for piece in latex.split():  # spaces go, except where they end a command: `\pi r` is not `\pir`
        out += " " + piece if _COMMAND_END.search(out) and piece[0].isalpha() else piece
    return out


def number(text: str) -> tuple[Fraction, bool] | None:
    """(value, is a decimal) of a plain number written as an integer, decimal, `a/b` or `\\frac{a}{b}`; else None."""
    t = notation(text)
    if _THOUSANDS.match(t):
        t = t.replace(",", "")
    if _NUMBER.match(t):
        return Fraction(t), "." in t
    m = _SLASH.match(t)
    if m and int(m.group(2)):
        return Fraction(int(m.group(1)), int(m.group(2))), False
    m = _FRAC.match(t)
    if m and int(m.group(4) or m.group(5)):
        value = Fraction(int(m.group(2) or m.group(3)), int(m.group(4) or m.group(5)))
        return value * (-1 if m.group(1) == "-" else 1), False
    return None


def same_number(a: tuple[Fraction, bool], b: tuple[Fraction, bool], float_rounding: int) -> bool:
    if a[0] == b[0]:
        return True
    if a[1] or b[1]:  # a decimal: equal to `float_rounding` places (Math-Verify's float_rounding)
        return round(float(a[0]), float_rounding) == round(float(b[0]), float_rounding)
    return False


@lru_cache(maxsize=8192)
def parse_gold(gold: str):
    """(the gold answer as compared, Math-Verify's parse of it): GSM8K's after `####`, MATH's `answer`, a
    solution's last box. Cached: n answers to one problem parse its gold once."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = gold_answer(gold)
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    return text, parse(f"${text}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                       parsing_timeout=_timeout())


def answer_text(answer: str) -> str | None:
    """The reply's last boxed answer, else what follows its last `####` (GSM8K's format); None: neither."""
    boxed = last_boxed(answer or "")
    if boxed is None and GSM8K_MARK in (answer or ""):
        return answer.rsplit(GSM8K_MARK, 1)[1].strip()
    return boxed


def verify_math(answer: str, gold: str, float_rounding: int = 6, shortcuts: bool = True) -> Verdict:
    """Accept `answer` when it equals `gold` (`float_rounding` decimals for numbers); `shortcuts`: False to
    send every pair to Math-Verify (the benchmark's comparison)."""
    from math_verify import parse, verify

    boxed = answer_text(answer)
    gold_text = gold_answer(gold)
    if shortcuts and boxed is not None:
        if notation(boxed) == notation(gold_text):
            return Verdict(True, "match", boxed, gold_text, detail={"path": "same_latex"})
        a, g = number(boxed), number(gold_text)
        if a is not None and g is not None:
            ok = same_number(a, g, float_rounding)
            return Verdict(ok, "match" if ok else "mismatch", boxed, gold_text, detail={"path": "numbers"})
    gold_text, parsed_gold = parse_gold(str(gold))
    if not parsed_gold:
        return Verdict(False, "bad_gold", None, gold_text, detail={"path": "math_verify"})
    parsed = parse(f"$\\boxed{{{boxed}}}$" if boxed is not None else (answer or ""), parsing_timeout=_timeout())
    if not parsed:
        return Verdict(False, "no_answer", None, gold_text, detail={"path": "math_verify"})
    extracted = boxed if boxed is not None else str(parsed[-1])
    ok = verify(parsed_gold, parsed, float_rounding=float_rounding, timeout_seconds=_timeout())
    return Verdict(bool(ok), "match" if ok else "mismatch", extracted, gold_text, detail={"path": "math_verify"})
