"""Pairwise judging of the student against reference answers, AlpacaEval style.

Output 1 is the reference and output 2 the student, as in AlpacaEval's annotation files; a
preference is 1 (reference better), 2 (student better) or 1.5 (a draw). What the judge sees
depends on the order: `random` shows the pair in a seeded random order per prompt, `both`
asks twice with the outputs swapped and counts a disagreement as a draw (and as a position
flip). An unreadable verdict is a draw too, and is counted. `stages/lib/judging/winrate.py` turns the
preferences into the win rate and its standard error.
"""

from __future__ import annotations

import hashlib
import re

from stages.lib.judging.winrate import longer_wins_rate, position_flip_rate, win_rate

JUDGE_PROMPT = """You are comparing two answers to the same instruction. Pick the answer that follows the \
instruction better: helpful, correct, complete and to the point. Do not prefer an answer for its \
length or for the order in which it is shown.

## Instruction

{instruction}

## Output (a)

{a}

## Output (b)

{b}

## Verdict

Which output is better? Reply with exactly "Output (a)" or "Output (b)"."""

_VERDICT = re.compile(r"output\s*\(?\s*([ab])\s*\)?", re.IGNORECASE)
_BARE = re.compile(r"^\W*\(?([ab])\)?(?:\W|$)", re.IGNORECASE)


def pairwise_judge_prompt(instruction: str, first: str, second: str) -> str:
    """The evaluation judge's prompt: which of two outputs (reference and student, in the order given) is better."""
    return JUDGE_PROMPT.format(instruction=instruction.strip(), a=first.strip(), b=second.strip())


def parse_verdict(text: str | None) -> int | None:
    """1 when the first output shown wins, 2 when the second does, None when the reply says neither."""
    if not text:
        return None
    m = _VERDICT.search(text) or _BARE.match(text.strip())
    return None if m is None else 1 + "ab".index(m.group(1).lower())


def student_first(seed: int, set_name: str, prompt_id: str) -> bool:
    """The seeded coin of `random` order: does the student's answer come first for this prompt?"""
    digest = hashlib.sha256(f"{seed}\0{set_name}\0{prompt_id}".encode()).digest()
    return digest[0] & 1 == 1


def preference(verdict: int | None, shown_student_first: bool) -> float:
    """AlpacaEval preference (1 reference, 2 student, 1.5 draw) from a verdict on the shown order."""
    if verdict is None:
        return 1.5
    student_won = (verdict == 1) == shown_student_first
    return 2.0 if student_won else 1.0


def combine(ref_first: int | None, stud_first: int | None) -> float:
    """Both orders asked: the preference they agree on, else a draw."""
    a, b = preference(ref_first, False), preference(stud_first, True)
    return a if a == b else 1.5


def summarize(rows: list[dict], order: str) -> dict:
    """Win rate ± standard error and the bias diagnostics of one eval set's judged rows.

    Each row: reference, answer, preference, finish_reason, answer_tokens, and the raw verdicts
    (`verdict_ref_first`, `verdict_student_first`; None where not asked or not readable).
    """
    wr = win_rate(r["preference"] for r in rows)
    asked = [r for r in rows if r.get("judged")]
    unread = sum((r["verdict_ref_first"] is None if r["order"] != "student_first" else False)
                 + (r["verdict_student_first"] is None if r["order"] != "ref_first" else False) for r in asked)
    both = [r for r in asked if r["verdict_ref_first"] is not None and r["verdict_student_first"] is not None]
    flips = position_flip_rate((float(r["verdict_ref_first"]), float(r["verdict_student_first"])) for r in both)
    longer = longer_wins_rate((r["reference"], r["answer"], r["preference"]) for r in rows)
    n = len(rows)
    return {
        "n": n,
        "win_rate": _round(wr["win_rate"]),
        "standard_error": _round(wr["standard_error"]),
        "wins": wr["wins"], "losses": wr["losses"], "draws": wr["draws"],
        "identical": sum(not r.get("judged") for r in rows),
        "judge_unparsed": unread,
        "position_flip_rate": _round(flips) if order == "both" else None,
        "longer_wins_rate": _round(longer),
        "stop_rate": _round(sum(r["finish_reason"] == "stop" for r in rows) / n) if n else None,
        "answer_tokens_mean": _round(sum(r["answer_tokens"] for r in rows) / n, 1) if n else None,
    }


def _round(x: float | None, digits: int = 4):
    return None if x is None or x != x else round(x, digits)  # NaN (nothing to measure) -> None
