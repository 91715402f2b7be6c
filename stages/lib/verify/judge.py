"""An optional LLM-judge fallback beside a rule verifier, and the policy that combines their verdicts.

open-r1 accepts what either Math-Verify or a judge accepts (`union`, its recommendation after ablating both,
Update #3); `intersection` keeps only what both accept. The judge is asked only where it can change the
outcome (`needs_judge`): under `union` for answers the rule rejected, under `intersection` for answers it
accepted, under `rule` never. A judge is any callable `(problem, answer, gold) -> bool | None` (None: it
could not decide, or failed: the rule's verdict stands, never a guess). `combine` is pure, so a policy
change reruns no judge call that is cached.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from stages.lib.verify import Verdict

POLICIES = ("rule", "union", "intersection")
Judge = Callable[[str, str, str], "bool | None"]


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")


def needs_judge(rule_ok: bool, policy: str) -> bool:
    """Whether the judge's verdict can change the outcome of a rule verdict `rule_ok` under `policy`."""
    check_policy(policy)
    return (policy == "union" and not rule_ok) or (policy == "intersection" and rule_ok)


def combine(rule: Verdict, judge_ok: bool | None, policy: str) -> Verdict:
    """The verdict under `policy` of `rule` and the judge's `judge_ok` (None: not asked or undecided).
    `by` says who accepted: `both`, `rule_only`, `judge_only` (the judge fallback alone accepted it) or `none`."""
    check_policy(policy)
    r = bool(rule.ok)
    if policy == "rule" or judge_ok is None:
        ok = r
    elif policy == "union":
        ok = r or judge_ok
    else:
        ok = r and judge_ok
    if judge_ok is None:
        by = "rule"
    else:
        by = {(True, True): "both", (True, False): "rule_only", (False, True): "judge_only",
              (False, False): "none"}[(r, bool(judge_ok))]
    detail = {**rule.detail, "rule_ok": r, "judge_ok": judge_ok, "policy": policy}
    reason = rule.reason if ok == r else ("judge_accepted" if ok else "judge_rejected")
    return replace(rule, ok=ok, by=by, reason=reason, detail=detail)


def judged(rule: Verdict, problem: str, answer: str, gold: str, judge: Judge | None, policy: str) -> Verdict:
    """`rule` combined with `judge`'s verdict, the judge asked only where `needs_judge` says it matters."""
    if judge is None or not needs_judge(rule.ok, policy):
        return combine(rule, None, policy)
    try:
        verdict = judge(problem, answer, gold)
    except Exception as e:  # noqa: BLE001 - a failed judge decides nothing: the rule's verdict stands, and says so
        out = combine(rule, None, policy)
        out.detail["judge_error"] = f"{type(e).__name__}: {e}"[:300]
        return out
    return combine(rule, None if verdict is None else bool(verdict), policy)
