"""Selection policies: which scored rows to keep, by a threshold, top-k or a top fraction.

A policy is a small dict from params (`select.policy`):

    {score: rating, threshold: 4.5}     # AlpaGasus: keep rating >= 4.5
    {score: ifd, top_fraction: 0.1}     # Cherry-LLM: the top 10% by IFD
    {score: combined, top_k: 1000}      # the mean percentile rank of rating and IFD

Higher is better for every score. A row whose deciding score is unknown (None: an unreadable
verdict, a failed call) is never treated as 0: it is rejected as `unknown_<score>`, or kept
when `keep_unknown` is set. Ties at a top-k / top-fraction cut go to the earlier row, so the
choice is deterministic. Pure functions: no file, no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCORES = ("rating", "ifd", "combined")
KINDS = ("threshold", "top_k", "top_fraction")


@dataclass(frozen=True)
class Policy:
    score: str
    kind: str
    value: float

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        """Check and build a policy from params; raises ValueError naming the bad key."""
        if not isinstance(d, dict):
            raise ValueError(f"policy: expected a mapping, got {d!r}")
        unknown = set(d) - {"score", *KINDS}
        if unknown:
            raise ValueError(f"policy: unknown key(s) {sorted(unknown)}; known: score, {', '.join(KINDS)}")
        if d.get("score") not in SCORES:
            raise ValueError(f"policy.score: expected one of {SCORES}, got {d.get('score')!r}")
        kinds = [k for k in KINDS if d.get(k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"policy: give exactly one of {', '.join(KINDS)} (got {kinds or 'none'})")
        kind, value = kinds[0], d[kinds[0]]
        if kind == "top_k" and (not isinstance(value, int) or value < 0):
            raise ValueError(f"policy.top_k: expected an integer >= 0, got {value!r}")
        if kind == "top_fraction" and not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ValueError(f"policy.top_fraction: expected a number in [0, 1], got {value!r}")
        if kind == "threshold" and not isinstance(value, (int, float)):
            raise ValueError(f"policy.threshold: expected a number, got {value!r}")
        return cls(d["score"], kind, float(value))

    def describe(self) -> str:
        return f"{self.score} {'>=' if self.kind == 'threshold' else self.kind.replace('_', ' ')} {self.value:g}"


def percentile_ranks(values: list[float | None]) -> list[float | None]:
    """Each known value's rank among the known ones scaled to [0, 1] (ties share their mean rank;
    a single known value gets 1.0); None stays None."""
    known = sorted((v, i) for i, v in enumerate(values) if v is not None)
    out: list[float | None] = [None] * len(values)
    n, j = len(known), 0
    while j < n:
        k = j
        while k + 1 < n and known[k + 1][0] == known[j][0]:
            k += 1
        rank = (j + k) / 2 / (n - 1) if n > 1 else 1.0
        for m in range(j, k + 1):
            out[known[m][1]] = rank
        j = k + 1
    return out


def combined(columns: dict[str, list[float | None]]) -> list[float | None]:
    """The mean of each score's percentile rank among the rows where every score is known; None elsewhere."""
    cols = list(columns.values())
    complete = [all(c[i] is not None for c in cols) for i in range(len(cols[0]))]
    ranks = [percentile_ranks([v if ok else None for v, ok in zip(c, complete)]) for c in cols]
    return [sum(r[i] for r in ranks) / len(ranks) if ok else None for i, ok in enumerate(complete)]


def apply(policy: Policy, scores: list[float | None],
          keep_unknown: bool = False) -> tuple[list[bool], list[str | None], float | None]:
    """(kept?, reason or None, the cut) per row. The cut is the threshold, or the lowest kept score
    under top-k / top-fraction (None when nothing is kept by score)."""
    n_known = sum(s is not None for s in scores)
    if policy.kind == "threshold":
        keep = [s is not None and s >= policy.value for s in scores]
        cut = policy.value
        why = f"{policy.score}_below_threshold"
    else:
        k = int(policy.value) if policy.kind == "top_k" else math.ceil(policy.value * n_known - 1e-9)
        order = sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: (-scores[i], i))
        chosen = set(order[:k])
        keep = [i in chosen for i in range(len(scores))]
        cut = scores[order[k - 1]] if 0 < k <= len(order) else (scores[order[-1]] if order and k else None)
        why = f"{policy.score}_not_in_{policy.kind}"
    reasons: list[str | None] = []
    for i, s in enumerate(scores):
        if s is None:
            keep[i] = keep_unknown
            reasons.append(None if keep_unknown else f"unknown_{policy.score}")
        else:
            reasons.append(None if keep[i] else why)
    return keep, reasons, cut
