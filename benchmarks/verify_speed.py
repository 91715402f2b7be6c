"""Verifier speed, side by side in one run: math answers per second with false rejections, and the code
sandbox's cost per test.

Math: MATH-500's 500 gold answers, each checked against itself rewritten in the equivalent forms that apply
to it (a reply's `\\boxed{}` in a sentence; spaces added around operators and commas; `\\dfrac`; `\\left(`
/`\\right)` dropped; a number's fraction as a decimal or `a/b`, an integer as `n.0`; a symbolic `\\frac{x}{y}`
as `(x)/(y)`, except in a mixed number: `1\\frac{4}{5}`). Spaces are ignored in LaTeX's math mode, so
`10 , \\!080` is `10,\\!080`. Every pair is equal, so every rejection is a false rejection. Two arms, each in a fresh
process with nothing cached (the gold parse cache starts empty): `verify_math` as the tool runs it (the
exact shortcuts, then Math-Verify) and Math-Verify alone (`shortcuts=False`). The first call (loading
Math-Verify and its ANTLR grammar) is timed apart.

Code: per test, the wall time of one stdin/stdout case (`run_tests`, a two-line solution) and of the
sandbox's empty run (`run_python("pass")`), against a bare `python -I -S -c pass` (an interpreter start,
the floor any process-per-test sandbox pays); the overhead is sandbox minus bare.

    python -m benchmarks.verify_speed [--math500 PATH] [--code-runs 50]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rewrites(gold: str) -> dict[str, str]:
    """The equivalent forms of `gold` that apply to it, each as a whole reply: form name -> reply."""
    from stages.lib.verify.math_answer import number

    forms = {"boxed_sentence": gold}
    spaced = re.sub(r"\s*([,+=<>]|(?<![\^_{])-)\s*", r" \1 ", gold).strip()
    if spaced != gold:
        forms["spaces"] = spaced
    if "\\frac" in gold:
        forms["dfrac"] = gold.replace("\\frac", "\\dfrac")
    if "\\left" in gold or "\\right" in gold:
        forms["no_left_right"] = re.sub(r"\\(left|right)(?![a-zA-Z])\s*", "", gold)
    n = number(gold)
    if n is not None and n[0].denominator != 1:
        value: Fraction = n[0]
        d = value.denominator
        while d % 2 == 0:
            d //= 2
        while d % 5 == 0:
            d //= 5
        exact = format(Decimal(value.numerator) / Decimal(value.denominator), "f")  # fixed point, no 6.72e-05
        forms["number"] = exact if d == 1 else f"{value.numerator}/{value.denominator}"
    elif n is not None:
        forms["number"] = f"{n[0].numerator}.0"
    elif re.search(r"\\frac\{[^{}]+\}\{[^{}]+\}", gold) and not re.search(r"\d\s*\\frac", gold):
        forms["frac_as_slash"] = re.sub(r"\\frac\{([^{}]+)\}\{([^{}]+)\}", r"(\1)/(\2)", gold)
    return {k: f"The final answer is $\\boxed{{{v}}}$." for k, v in forms.items()}


def math_arm(path: str, shortcuts: bool) -> None:
    """One arm, in this (fresh) process: prints one JSON line."""
    t0 = time.perf_counter()
    from stages.lib.verify.math_answer import verify_math

    verify_math("\\boxed{\\frac{x}{2}}", "\\frac{y}{3}", shortcuts=False)  # loads Math-Verify and its grammar
    first = time.perf_counter() - t0
    verify_math.__globals__["parse_gold"].cache_clear()
    golds = [json.loads(line)["answer"] for line in Path(path).read_text().splitlines() if line.strip()]
    pairs = [(form, reply, g) for g in golds for form, reply in rewrites(g).items()]
    rejected, paths, by_form = [], Counter(), Counter()
    t = time.perf_counter()
    for form, reply, g in pairs:
        v = verify_math(reply, g, shortcuts=shortcuts)
        paths[v.detail["path"]] += 1
        by_form[form] += 1
        if not v.ok:
            rejected.append({"form": form, "gold": g, "reply": reply, "reason": v.reason})
    seconds = time.perf_counter() - t
    print(json.dumps({"arm": "shortcuts+math_verify" if shortcuts else "math_verify_only", "golds": len(golds),
                      "answers": len(pairs), "seconds": round(seconds, 2),
                      "answers_per_s": round(len(pairs) / seconds, 1), "first_call_s": round(first, 2),
                      "false_rejections": len(rejected), "rejected": rejected[:20], "paths": dict(paths),
                      "forms": dict(by_form)}))


def code_arm(runs: int) -> dict:
    from stages.lib.verify.code import isolation, run_python, run_tests

    def per_run(f) -> float:
        f()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1000

    bare = per_run(lambda: subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True))
    empty = per_run(lambda: run_python("pass"))
    solution = "a, b = map(int, input().split())\nprint(a + b)"
    case = per_run(lambda: run_tests(solution, [{"input": "2 3", "output": "5"}]))
    return {"arm": "code_sandbox", "runs": runs, "network": isolation()["network"],
            "bare_python_ms": round(bare, 1), "sandbox_empty_ms": round(empty, 1), "one_test_ms": round(case, 1),
            "overhead_ms": round(empty - bare, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--math500", default=None, help="MATH-500's test jsonl (default: the reference data's)")
    ap.add_argument("--code-runs", type=int, default=50)
    ap.add_argument("--arm", choices=("shortcuts", "math_verify"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.math500 is None:
        sys.path.insert(0, str(ROOT))
        from tests.support.tiny import SHARED

        a.math500 = str(SHARED / "math" / "math500_test.jsonl")
    if a.arm:
        math_arm(a.math500, a.arm == "shortcuts")
        return
    results = []
    for arm in ("shortcuts", "math_verify"):  # each in a fresh process: nothing parsed or cached before
        out = subprocess.run([sys.executable, "-m", "benchmarks.verify_speed", "--arm", arm, "--math500", a.math500],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    results.append(code_arm(a.code_runs))
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
