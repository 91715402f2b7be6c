"""Pairwise-judge arithmetic as AlpacaEval computes it, plus bias diagnostics.

A preference per prompt: 1 = the reference (output 1) wins, 2 = the student (output 2) wins,
a draw counts half (AlpacaEval stores it as 1.5; its annotation files also use 0). The win
rate is the mean of (preference - 1) in percent and its standard error the sample standard
error of the mean (ddof 1), as `alpaca_eval.metrics` reports them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def student_score(preference: float) -> float:
    """1 when the student (output 2) wins, 0 when the reference wins, 0.5 for a draw."""
    if preference in (0, 1.5):
        return 0.5
    if preference not in (1, 2):
        raise ValueError(f"preference must be 1, 2 or a draw (0 / 1.5), got {preference!r}")
    return float(preference - 1)


def win_rate(preferences: Iterable[float]) -> dict:
    scores = [student_score(p) for p in preferences]
    n = len(scores)
    if n == 0:
        return {"win_rate": float("nan"), "standard_error": float("nan"), "n": 0, "wins": 0, "losses": 0, "draws": 0}
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / (n - 1) if n > 1 else 0.0
    return {"win_rate": 100 * mean, "standard_error": 100 * math.sqrt(var / n), "n": n,
            "wins": sum(s == 1 for s in scores), "losses": sum(s == 0 for s in scores),
            "draws": sum(s == 0.5 for s in scores)}


def longer_wins_rate(pairs: Iterable[tuple[str, str, float]]) -> float:
    """Share of decided comparisons (output 1, output 2, preference) won by the longer output."""
    decided = [(a, b, p) for a, b, p in pairs if student_score(p) != 0.5 and len(a) != len(b)]
    if not decided:
        return float("nan")
    return sum((len(b) > len(a)) == (student_score(p) == 1) for a, b, p in decided) / len(decided)


def position_flip_rate(both_orders: Iterable[tuple[float, float]]) -> float:
    """Share of prompts whose verdict changed when the two outputs swapped places.

    Each item: (preference with the reference first, preference with the student first, as
    seen by the judge: 1 = first shown wins). A consistent judge picks the same answer twice.
    """
    items = list(both_orders)
    if not items:
        return float("nan")
    flips = 0
    for ref_first, student_first in items:
        a = student_score(ref_first)  # student's score in the first order
        b = 1 - student_score(student_first)  # student is shown first: output 1 wins means student wins
        flips += a != b
    return flips / len(items)
