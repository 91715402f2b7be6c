"""The verifiers (stages/lib/verify) and `python -m stages.tools.verify`: math with Math-Verify, short answers,
code in the sandbox, the judge policy; checked on GSM8K's and MATH-500's real gold answers where present."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from stages.lib.verify import VERSION, library_versions, verifier_id, verify
from stages.lib.verify.code import Limits, isolation, run_python, run_tests, verify_code
from stages.lib.verify.extract import code_block, gold_answer, last_boxed
from stages.lib.verify.judge import combine, judged, needs_judge
from stages.lib.verify.math_answer import notation, number, verify_math
from stages.lib.verify.short import answer_part, verify_short
from tests.support.tiny import ROOT, shared

QUICK = Limits(cpu_s=1, wall_s=2, memory_mb=256)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- where the answer is


def test_gold_and_boxed_answers_are_found():
    assert gold_answer("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gold_answer("so $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert gold_answer(" \\left( 3, \\frac{\\pi}{2} \\right) ") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b^{2}}}") == "\\frac{a}{b^{2}}"  # the last, nested
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces are not structure
    assert last_boxed("\\boxed{never closed") is None and last_boxed("none") is None
    assert code_block("a\n```js\nx\n```\n```python\nprint(1)\n```\ntail") == "print(1)\n"
    assert code_block("```\nraw\n```") == "raw\n" and code_block("print(2)") == "print(2)"


# ---------------------------------------------------------------- math


@pytest.mark.parametrize("answer, gold", [
    ("So the answer is $\\boxed{0.5}$.", "\\frac{1}{2}"),
    ("$\\boxed{\\dfrac{1}{2}}$", "\\frac12"),
    ("\\boxed{1/2}", "0.5"),
    ("\\boxed{ 3 , \\frac{ \\pi }{ 2 } }", "3,\\frac{\\pi}{2}"),
    ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2"),
    ("\\boxed{0.333333}", "\\frac{1}{3}"),  # six decimals, as Math-Verify rounds
    ("\\boxed{1,000}", "1000"),
    ("The answer: #### 18", "Janet sells 9 eggs.\n#### 18"),
    ("\\boxed{90^\\circ}", "90"),
])
def test_equal_answers_in_other_forms_are_accepted(answer, gold):
    v = verify_math(answer, gold)
    assert v.ok and v.reason == "match", v
    assert verify_math(answer, gold, shortcuts=False).ok  # Math-Verify alone agrees with the shortcuts


@pytest.mark.parametrize("answer, gold", [
    ("\\boxed{2}", "3"),
    ("\\boxed{0.34}", "\\frac{1}{3}"),
    ("\\boxed{\\frac123}", "4"),  # \frac123 is (1/2)*3, not 12/3
    ("\\boxed{x^3}", "x^2"),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
])
def test_different_answers_are_rejected(answer, gold):
    v = verify_math(answer, gold)
    assert not v.ok and v.reason == "mismatch", v
    assert not verify_math(answer, gold, shortcuts=False).ok


def test_no_answer_and_a_bad_gold_say_so():
    assert verify_math("", "5").reason == "no_answer"
    assert verify_math("\\boxed{5}", "").reason == "bad_gold"


def test_the_shortcuts_are_notation_only():
    assert notation("\\left( 1, 2 \\right)") == notation("(1,2)") == "(1,2)"
    assert notation("\\pi r") != notation("\\pir")
    assert notation("\\rightarrow") != notation("arrow")
    assert number("\\frac{-3}{4}")[0] == number("-0.75")[0] and number("x") is None and number("\\frac123") is None


def test_math500_gold_answers_verify_against_their_solutions():
    rows = read_jsonl(shared("math", "math500_test.jsonl"))
    assert len(rows) == 500
    rejected = [r["unique_id"] for r in rows if not verify_math(r["solution"], r["answer"]).ok]
    assert rejected == []
    # Math-Verify alone, without the shortcuts, on a spread of 40 (it takes ~50 ms an answer)
    sample = rows[::12]
    assert [r["unique_id"] for r in sample if not verify_math(r["solution"], r["answer"], shortcuts=False).ok] == []
    # and each gold against a different problem's gold is rejected unless the two are the same value
    wrong = [(a["answer"], b["answer"]) for a, b in zip(rows, rows[1:])
             if notation(a["answer"]) != notation(b["answer"])
             and verify_math(f"\\boxed{{{b['answer']}}}", a["answer"]).ok]
    assert wrong == [("5", "x=5")]  # the one neighbour of equal value: Math-Verify reads `x=5` as 5


def test_gsm8k_gold_numbers_verify_as_math_and_as_short_answers():
    rows = read_jsonl(shared("math", "gsm8k_test.jsonl"))
    assert len(rows) == 1319
    for r in rows:
        n = r["answer"].rsplit("####", 1)[1].strip()
        assert verify_math(f"The answer is $\\boxed{{{n}}}$.", r["answer"]).ok, n
        assert verify_short(f"So she makes ${n} a day.\n#### {n}", r["answer"]).ok, n
        off = str(int(n.replace(",", "")) + 1)
        assert not verify_short(f"#### {off}", r["answer"]).ok and not verify_math(f"\\boxed{{{off}}}", r["answer"]).ok


# ---------------------------------------------------------------- short answers


@pytest.mark.parametrize("answer, gold, mode, ok", [
    ("She makes $18 every day.\n#### 18", "#### 18", "auto", True),
    ("The answer is 1,600 dollars.", "1600", "auto", True),
    ("The answer is 17.", "18", "auto", False),
    ("\\boxed{3/4}", "0.75", "numeric", True),
    ("Paris.", "paris", "auto", True),
    ("Answer: The Eiffel Tower", "eiffel tower", "exact", True),
    ("Lyon", "Paris", "exact", False),
    ("18", "eighteen", "exact", False),
    ("no number here", "5", "auto", False),
])
def test_short_answers_exact_and_numeric(answer, gold, mode, ok):
    assert verify_short(answer, gold, mode=mode).ok is ok


def test_short_answer_reasons_and_the_answer_part():
    assert verify_short("no number here", "5").reason == "no_answer"
    assert verify_short("5", "five", mode="numeric").reason == "bad_gold"
    assert answer_part("working...\nThe answer is 42.\nDone") == "42."
    with pytest.raises(ValueError):
        verify_short("1", "1", mode="fuzzy")


# ---------------------------------------------------------------- code in the sandbox


def test_stdin_cases_pass_or_fail_token_by_token():
    add = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    cases = [{"input": "1 2", "output": "3"}, {"input": "10 -4\n", "output": "6\n\n"}]
    v = verify_code(add, cases, QUICK)
    assert v.ok and v.reason == "passed" and v.detail["tests_passed"] == 2
    v = verify_code(add, cases + [{"input": "2 2", "output": "5"}], QUICK)
    assert not v.ok and v.reason == "wrong_answer" and v.detail["failed_case"] == 2 and v.detail["tests_passed"] == 2
    assert run_tests("raise SystemExit(3)", [{"input": "", "output": ""}], QUICK).reason == "runtime_error"
    assert run_tests("print(1)", [], QUICK).reason == "bad_gold"


def test_assert_tests_run_after_the_code():
    assert run_tests("def f(x):\n    return 2 * x", "assert f(2) == 4\nassert f(0) == 0", QUICK).ok
    v = run_tests("def f(x):\n    return 3 * x", "assert f(2) == 4", QUICK)
    assert not v.ok and v.reason == "wrong_answer"


@pytest.mark.parametrize("code, reason", [
    ("while True:\n    pass", "time_limit"),  # CPU limit
    ("import time\ntime.sleep(30)", "time_limit"),  # wall limit: no CPU used
    ("x = bytearray(1 << 30)", "memory_limit"),
    ("open('big', 'wb').write(b'x' * (64 << 20))", "output_limit"),
])
def test_limits_stop_runaway_programs(code, reason):
    v = run_tests(code, [{"input": "", "output": ""}], Limits(cpu_s=1, wall_s=1.5, memory_mb=256, file_mb=4))
    assert not v.ok and v.reason == reason, v
    assert v.detail["seconds"] < 5


def test_the_child_sees_a_scrubbed_environment_and_a_scratch_folder(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-value-must-not-leak")
    run = run_python("import os, sys\nprint(sorted(os.environ))\nprint(os.getcwd())\nprint(sys.path)", "", QUICK)
    env, cwd, path = run.stdout.splitlines()
    assert "OPENAI_API_KEY" not in env and "test-value-must-not-leak" not in run.stdout
    assert set(eval(env)) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED"}
    assert "stillhouse-sandbox-" in cwd and not os.path.exists(cwd)  # removed afterwards
    assert cwd not in path and "site-packages" not in path  # isolated mode, no site packages


def test_the_child_has_no_network():
    if isolation()["network"] != "namespace":
        pytest.skip("this kernel refuses user and network namespaces: the sandbox runs with the network open")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
        exec(code.replace("print('connected')", ""))  # from this process the server is there
        v = run_tests(code, [{"input": "", "output": "connected"}], QUICK)
    assert not v.ok and v.reason == "runtime_error" and "unreachable" in v.detail["stderr"]
    assert v.detail["network"] == "namespace"


def test_require_no_network_refuses_where_it_cannot_be_cut(monkeypatch):
    import stages.lib.verify.code as code

    monkeypatch.setattr(code, "isolation", lambda: {"network": "open", "flags": 0})
    assert code.run_python("print(1)", "", QUICK).stdout == "1\n"  # runs, and says so in every verdict
    assert code.run_tests("print(1)", [{"input": "", "output": "1"}], QUICK).detail["network"] == "open"
    with pytest.raises(RuntimeError, match="cannot cut"):
        code.run_python("print(1)", "", Limits(require_no_network=True))


# ---------------------------------------------------------------- the judge policy


def test_combine_is_union_or_intersection_and_says_who_accepted():
    yes, no = verify_math("\\boxed{1}", "1"), verify_math("\\boxed{2}", "1")
    assert (combine(no, True, "union").ok, combine(no, True, "union").by) == (True, "judge_only")
    assert (combine(yes, False, "union").ok, combine(yes, False, "union").by) == (True, "rule_only")
    assert (combine(yes, False, "intersection").ok, combine(no, True, "intersection").ok) == (False, False)
    assert (combine(yes, True, "intersection").ok, combine(yes, True, "intersection").by) == (True, "both")
    assert combine(no, None, "union").ok is False and combine(no, None, "union").by == "rule"
    assert combine(no, True, "rule").ok is False
    assert combine(no, True, "union").reason == "judge_accepted"
    with pytest.raises(ValueError):
        combine(yes, True, "majority")


def test_the_judge_is_asked_only_where_it_can_change_the_outcome():
    assert [needs_judge(ok, p) for ok in (True, False) for p in ("rule", "union", "intersection")] == \
        [False, False, True, False, True, False]
    asked = []

    def judge(problem, answer, gold):
        asked.append(answer)
        return True

    rule = verify_math("\\boxed{2}", "1")
    assert judged(rule, "p", "\\boxed{2}", "1", judge, "union").by == "judge_only" and asked == ["\\boxed{2}"]
    assert judged(rule, "p", "\\boxed{2}", "1", judge, "intersection").ok is False and len(asked) == 1

    def broken(problem, answer, gold):
        raise TimeoutError("judge down")

    v = judged(rule, "p", "x", "1", broken, "union")
    assert v.ok is False and v.by == "rule" and "judge down" in v.detail["judge_error"]


# ---------------------------------------------------------------- identity


def test_the_verifier_identity_names_versions_and_policy():
    ident = json.loads(verifier_id("math"))
    assert ident["libraries"]["math-verify"] == library_versions()["math-verify"] == "0.9.0"
    assert ident["stillhouse_verify"] == VERSION
    assert verifier_id("math") != verifier_id("math", policy="union")
    assert verifier_id("math") != verifier_id("short") and "math-verify" not in verifier_id("short")
    assert verifier_id("code", cpu_s=1) != verifier_id("code", cpu_s=2)
    with pytest.raises(ValueError):
        verifier_id("chess")
    assert verify("short", "#### 4", "4").ok and verify("math", "\\boxed{4}", "4").ok


def test_the_pin_is_the_installed_version():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'"math-verify=={library_versions()["math-verify"]}"' in text
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    for name in ("math-verify", "latex2sympy2_extended"):
        assert f"{name}=={library_versions()[name]}" in constraints


# ---------------------------------------------------------------- the tool


def tool(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.tools.verify", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_tool_writes_one_verdict_per_row(tmp_path):
    rows = [{"answer": "so $\\boxed{\\frac12}$", "gold": "0.5"}, {"response": "#### 17", "gold": "Blah #### 18"},
            {"response": "\\boxed{(3, \\pi/2)}", "gold": "\\left( 3, \\frac{\\pi}{2} \\right)", "id": "x"}]
    f = tmp_path / "answers.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    out = tmp_path / "verdicts.jsonl"
    r = tool(f, "--kind", "math", "--out", out)
    assert r.returncode == 0, r.stderr
    verdicts = read_jsonl(out)
    assert [(v["row"], v["ok"]) for v in verdicts] == [(0, True), (1, False), (2, True)]
    assert verdicts[0]["verifier"]["libraries"]["math-verify"] == "0.9.0"
    assert "2 of 3 accepted" in r.stderr
    assert tool(f, "--kind", "math", "--out", out).returncode != 0  # no overwrite without --force
    r = tool(f, "--kind", "short", "--jobs", "2")
    assert r.returncode == 0 and [json.loads(x)["ok"] for x in r.stdout.splitlines()] == [False, False, False]


def test_the_tool_runs_code_tests_and_names_bad_rows(tmp_path):
    f = tmp_path / "code.jsonl"
    f.write_text(json.dumps({"response": "```python\nprint(int(input()) * 2)\n```",
                             "tests": [{"input": "21", "output": "42"}]}) + "\n"
                 + json.dumps({"response": "print(0)", "gold": "assert False"}) + "\n")
    r = tool(f, "--kind", "code", "--wall-s", "3")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["reason"] for x in r.stdout.splitlines()] == ["passed", "wrong_answer"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"answer": "1", "gold": "1"}) + "\n" + json.dumps({"gold": "1"}) + "\n")
    r = tool(bad, "--kind", "math")
    assert r.returncode != 0 and "bad.jsonl:2: answer" in r.stderr
