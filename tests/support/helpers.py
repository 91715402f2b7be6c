"""Reference implementations the tests compare stage code with (no stage uses them).

`rouge_l_f1` / `f1_from_lcs`: ROUGE-L F1 exactly as rouge_score's `_score_lcs` computes it, with
rapidfuzz's C++ LCS (fast enough for brute-force loops over thousands of real instructions).
`encode_example`: a single-round Alpaca row encoded as (prompt ids, response ids), the way
evaluate feeds the prompt at inference.
"""

from __future__ import annotations

from rapidfuzz.distance import LCSseq

from stages.lib.tokens.templates import encode_example, render_prompt, user_message  # noqa: F401


def f1_from_lcs(lcs: int, m: int, n: int) -> float:
    """rouge_score's `_score_lcs(...).fmeasure` for LCS length `lcs` and token counts m, n."""
    if m == 0 or n == 0:
        return 0.0
    precision, recall = lcs / n, lcs / m
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def rouge_l_f1(target: list, prediction: list) -> float:
    """ROUGE-L F1 of two token lists, exactly as rouge_score's `_score_lcs` computes it."""
    if not target or not prediction:
        return 0.0
    return f1_from_lcs(LCSseq.similarity(target, prediction), len(target), len(prediction))


