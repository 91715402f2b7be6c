"""Answer verifiers: is a model's answer right, against a problem's gold answer or tests?

- `math_answer.verify_math`: Hugging Face's Math-Verify (`parse` / `verify`: LaTeX and plain expressions,
  `\\boxed{}`, fractions against decimals, sets, intervals, matrices) on the last boxed answer;
- `short.verify_short`: exact (normalised) or numeric match of a short answer (GSM8K's `#### 18`);
- `code.run_tests`: the problem's tests run on the code in a subprocess sandbox (CPU, memory, file size
  and wall-time limits, a scratch folder, a scrubbed environment, no network where the kernel allows);
- `judge.combine`: an optional LLM-judge verdict combined with the rule's by a union or intersection policy.

Each verdict is a `Verdict`; `verifier_id(kind, policy)` is the identity a cache of verdicts keys on: the
kind, the policy, this package's `VERSION` and the versions of the libraries that decide (math-verify and
its LaTeX parser), so changing any of them asks again. `verify(kind, answer, gold)` dispatches.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache

VERSION = 1
"""stillhouse's own verifier logic (answer extraction, normalisation, the sandbox): bump when a verdict may change."""
KINDS = ("math", "short", "code")


@dataclass
class Verdict:
    ok: bool
    """Accepted."""
    reason: str
    """Why: `match`, `mismatch`, `no_answer` (nothing to compare in the answer), `bad_gold`, or for code
    `passed`, `wrong_answer`, `runtime_error`, `time_limit`, `memory_limit`, `output_limit`."""
    extracted: str | None = None
    """The part of the answer that was compared (the last boxed answer, the code block)."""
    gold: str | None = None
    """The gold answer as compared (GSM8K's number after `####`)."""
    by: str = "rule"
    """Who accepted or rejected it: `rule`, or after a judge (`judge.combine`) `both`, `rule_only`, `judge_only`,
    `none`."""
    detail: dict = field(default_factory=dict)
    """Kind-specific facts: tests passed / run, seconds, the sandbox's isolation."""

    def row(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=None)
def library_versions() -> dict:
    """The installed versions of the libraries whose behaviour a verdict depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("math-verify", "latex2sympy2_extended", "sympy", "antlr4-python3-runtime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def verifier_id(kind: str, policy: str = "rule", judge: str | None = None, **options) -> str:
    """The cache identity of verdicts of `kind` (math, short, code) under `policy` (`rule`, `union`,
    `intersection`) with `judge` (the judge's own identity, e.g. its teacher id) and any options that change a
    verdict (a numeric tolerance, the sandbox's limits): the same string exactly when verdicts can be reused."""
    check_kind(kind)
    libs = library_versions()
    used = {"math": ("math-verify", "latex2sympy2_extended", "sympy", "antlr4-python3-runtime"),
            "short": (), "code": ()}[kind]
    payload = {"kind": kind, "stillhouse_verify": VERSION, "policy": policy, "judge": judge,
               "libraries": {k: libs[k] for k in used}, "options": options}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def verify(kind: str, answer: str, gold, **options) -> Verdict:
    """One verdict: `gold` is a string for math and short answers, the tests for code (`code.run_tests`)."""
    check_kind(kind)
    if kind == "math":
        from stages.lib.verify.math_answer import verify_math

        return verify_math(answer, gold, **options)
    if kind == "short":
        from stages.lib.verify.short import verify_short

        return verify_short(answer, gold, **options)
    from stages.lib.verify.code import verify_code

    return verify_code(answer, gold, **options)
