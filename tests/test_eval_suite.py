"""evaluate's judge-free suite (stages/lib/evals/suite.py, teacher_gap.py): the pinned IFEval subset, IFEval
answered and scored per model, the teacher-gap arithmetic and NLLs, the answer stats, the smoke-test flag and
the headline."""

from __future__ import annotations

import json
import math

import pytest

from stages.lib.errors import StageError
from stages.lib.evals import ifeval
from stages.lib.evals.suite import IfevalParams, headline, judge_is_smoke_test, run_ifeval, teacher_gap
from stages.lib.evals.teacher_gap import answer_nll, answer_stats, gap, pooled, repetition_rate
from stages.lib.llm.endpoint import EndpointParams
from stages.lib.params import params_from_dict
from tests.support.tiny import ROOT, make_tiny_model, shared

SUBSET = ROOT / "seeds" / "eval" / "ifeval_subset.jsonl"


# ---------------------------------------------------------------- the pinned subset


def test_the_pinned_subset_rebuilds_byte_for_byte_from_the_reference_data():
    full = shared("ifeval", "input_data.jsonl")
    assert ifeval.subset_lines(full, 24, 0) == SUBSET.read_text(encoding="utf-8")
    assert ifeval.subset_lines(full, 24, 1) != SUBSET.read_text(encoding="utf-8")


def test_the_pinned_subset_holds_every_instruction_type_and_its_readme_its_hash():
    import hashlib

    prompts = ifeval.load_prompts(SUBSET)
    assert len(prompts) == 24 and [p.key for p in prompts] == sorted(p.key for p in prompts)
    assert {i for p in prompts for i in p.instruction_id_list} == set(ifeval.registry())
    readme = (SUBSET.parent / "README.md").read_text()
    assert hashlib.sha256(SUBSET.read_bytes()).hexdigest() in readme
    assert "--write-subset seeds/eval/ifeval_subset.jsonl --subset 24 --seed 0" in readme and "Apache-2.0" in readme


def test_the_subset_is_decontaminated_against_and_is_evaluates_default():
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert "seeds/eval/ifeval_subset.jsonl" in params["ingest"]["decontaminate"]
    assert params["evaluate"]["ifeval"]["path"] == "seeds/eval/ifeval_subset.jsonl" == IfevalParams().path


def test_the_tool_writes_the_subset(tmp_path):
    from stages.tools.ifeval import main

    full = shared("ifeval", "input_data.jsonl")
    out = tmp_path / "sub.jsonl"
    main(["--prompts", str(full), "--write-subset", str(out), "--subset", "24"])
    assert out.read_bytes() == SUBSET.read_bytes()
    with pytest.raises(StageError, match="--write-subset: give --subset"):
        main(["--prompts", str(full), "--write-subset", str(tmp_path / "x.jsonl")])


# ---------------------------------------------------------------- answer stats and the gap arithmetic


@pytest.mark.parametrize("text,want", [
    ("a b c d a b c d", 1 - 4 / 5),  # 5 four-grams, `a b c d` twice
    ("loop loop loop loop loop loop", 1 - 1 / 3),
    ("The Cat sat on the cat sat on", 1 - 4 / 5),  # lower-cased
    ("one two three four five six", 0.0),
    ("too short", 0.0), ("", 0.0)])
def test_repetition_rate(text, want):
    assert repetition_rate(text) == pytest.approx(want)


def test_answer_stats():
    s = answer_stats([{"text": "a b c d a b c d", "finish_reason": "stop", "tokens": 8},
                      {"text": "fine", "finish_reason": "length", "tokens": 3},
                      {"text": "x", "finish_reason": "stop", "tokens": 1}])
    assert s == {"n": 3, "stop_rate": round(2 / 3, 4), "mean_answer_tokens": 4.0, "repetition_rate": round(0.2 / 3, 4)}
    assert answer_stats([])["stop_rate"] is None


def test_gap_closed_arithmetic():
    g = gap(2.0, 3.5, 1.5)  # KL student 0.5, base 2.0: three quarters of the base's distance removed
    assert (g["kl_student"], g["kl_base"], g["gap_closed"]) == (0.5, 2.0, 0.75)
    assert gap(4.0, 3.5, 1.5)["gap_closed"] == -0.25  # further from the teacher than the base
    assert gap(1.5, 3.5, 1.5)["gap_closed"] == 1.0
    assert gap(2.0, 1.5, 1.5) == {"kl_student": 0.5, "kl_base": 0.0, "gap_closed": None}  # the base is the teacher
    assert gap(2.0, 3.0, None) == {"kl_student": None, "kl_base": None, "gap_closed": None}
    assert gap(2.0, None, 1.0) == {"kl_student": 1.0, "kl_base": None, "gap_closed": None}
    assert pooled([(3.0, 2), (1.0, 2)]) == 1.0 and pooled([(0.0, 0)]) is None


# ---------------------------------------------------------------- NLLs on tiny models


def test_answer_nll_is_the_answer_tokens_loss_whatever_the_batch(tiny_model):
    import torch

    from stages.lib.evals.teacher_gap import answer_ids, render
    from stages.lib.llm.local import load_model

    model, tok = load_model(str(tiny_model))
    prompts = ["name a fruit", "write the list of three words", "a"]
    answers = [("apple", True), ("one two three words", False), ("", True)]
    one = answer_nll(model, tok, prompts, answers, batch_size=1)
    three = answer_nll(model, tok, prompts, answers, batch_size=3)  # right padding changes nothing
    assert [n for _, n in three] == [n for _, n in one]
    assert [s for s, _ in three] == pytest.approx([s for s, _ in one], rel=1e-4)
    for p, (a, stopped), (s, n) in zip(prompts, answers, one):
        ids, ans = render(tok, p), answer_ids(tok, a, stopped)
        assert n == len(ans) and (ans[-1] == tok.eos_token_id) == stopped
        labels = torch.tensor([[-100] * len(ids) + ans])
        with torch.inference_mode():
            loss = model(input_ids=torch.tensor([ids + ans]), labels=labels).loss
        assert s == pytest.approx(float(loss) * n, rel=1e-4)


def test_teacher_gap_on_tiny_models(tmp_path, tiny_model):
    """A student that is not the teacher; the base is the teacher's weights asked in the Alpaca format; a
    teacher behind an API, or with another tokenizer, is not scored."""
    from transformers import AutoTokenizer

    from stages.lib.llm.local import LocalBackend
    from stages.lib.llm.types import Sampling

    student = make_tiny_model(tmp_path / "student", AutoTokenizer.from_pretrained(tiny_model), seed=1)
    questions = [f"name a fruit {i}" for i in range(3)]
    refs = LocalBackend(str(tiny_model), "chat").complete(questions, Sampling(8, 0.0, 1.0, (), 0), 0)  # its own
    rows = [{"reference_source": "teacher", "instruction": q, "input": "", "reference": c.text.strip(),
             "reference_raw": c.text, "reference_finish_reason": c.finish_reason} for q, c in zip(questions, refs)]
    rows.append({"reference_source": "response", "instruction": "x", "input": "", "reference": "y",
                 "reference_raw": None, "reference_finish_reason": None})
    local = EndpointParams("local", str(tiny_model))
    g = teacher_gap(rows, str(student), str(tiny_model), "alpaca", local)
    assert g["prompts"] == 3 and g["teacher_scored"] and g["tokens"] == sum(c.completion_tokens for c in refs)
    assert g["kl_student"] == pytest.approx(g["nll_student"] - g["nll_teacher"], abs=1e-4)
    assert g["kl_base"] == pytest.approx(g["nll_base"] - g["nll_teacher"], abs=1e-4)
    assert g["kl_base"] != 0.0 and g["base_template"] == "alpaca"  # the base asked in the Alpaca format, not its own
    # a random tiny model is nearly indifferent to the format: the sign of its KL is chance (gap_closed's
    # arithmetic, both ways, is test_gap_closed_arithmetic's)
    assert g["gap_closed"] == (None if g["kl_base"] <= 0 else pytest.approx(1 - g["kl_student"] / g["kl_base"],
                                                                             abs=1e-3))
    same = teacher_gap(rows, str(tiny_model), str(tiny_model), "chat", local)  # the base is the teacher
    assert same["kl_student"] == same["kl_base"] == 0.0 and same["gap_closed"] is None
    api = teacher_gap(rows, str(student), None, "chat", EndpointParams("openai", "gpt-4o-mini"))
    assert api["nll_teacher"] is None and not api["teacher_scored"] and api["nll_student"] > 0
    assert api["gap_closed"] is None and api["nll_base"] is None
    other = make_tiny_model(tmp_path / "other", seed=2)  # its own tokenizer, trained again: not the student's
    assert teacher_gap(rows, str(student), None, "chat", EndpointParams("local", str(other)))["teacher_scored"] \
        == (AutoTokenizer.from_pretrained(other).get_vocab() == AutoTokenizer.from_pretrained(student).get_vocab())


# ---------------------------------------------------------------- IFEval in the stage, on doubles


def test_run_ifeval_scores_each_model_on_its_own_answers(tmp_path):
    rows = [{"key": 1, "prompt": "Say hi. Do not use any commas.", "instruction_id_list": ["punctuation:no_comma"],
             "kwargs": [{}]},
            {"key": 2, "prompt": "Say hi in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
             "kwargs": [{}]}]
    path = tmp_path / "ife.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    said = {"student": ["hi there friend", "hi there my good friend"],  # both pass
            "base": ["hi, there", "Hi There My Good Friend"],  # both fail
            "teacher": ["hi there", "HELLO THERE MY FRIEND"]}  # the first passes
    asked = {}

    def ask(who):
        def a(prompts, sampling):
            asked[who] = (prompts, sampling.max_new_tokens)
            return [{"text": t, "finish_reason": "stop", "completion_tokens": len(t.split())} for t in said[who]]
        return a

    df, m = run_ifeval(IfevalParams(path=str(path), max_new_tokens=7), ask, 0.0, 0)
    assert asked["student"] == ([r["prompt"] for r in rows], 7) and set(asked) == {"student", "base", "teacher"}
    assert [m[w]["prompt_level_strict"]["accuracy"] for w in ("student", "base", "teacher")] == [1.0, 0.0, 0.5]
    assert m["teacher"]["instruction_level_loose"]["n"] == 2 and m["prompts"] == 2
    assert m["teacher"]["prompt_level_strict"]["standard_error"] == pytest.approx(0.5, abs=1e-4)
    assert m["student"]["answers"]["stop_rate"] == 1.0
    assert df.height == 6 and df.filter(df["model"] == "base")["follow_all_strict"].to_list() == [False, False]
    assert run_ifeval(IfevalParams(path=str(path), models=[]), ask, 0.0, 0)[1] == {}
    with pytest.raises(StageError, match="file not found"):
        run_ifeval(IfevalParams(path=str(tmp_path / "none.jsonl")), ask, 0.0, 0)
    with pytest.raises(StageError, match="no base answer for key 1"):
        run_ifeval(IfevalParams(path=str(path), models=["base"]),
                   lambda who: lambda prompts, s: [None, None], 0.0, 0)


def test_ifeval_params_are_checked():
    from stages.evaluate import EvaluateParams

    with pytest.raises(StageError, match="models: unknown"):
        params_from_dict(EvaluateParams, {"ifeval": {"models": ["student", "judge"]}})
    with pytest.raises(StageError, match="ifeval"):
        params_from_dict(EvaluateParams, {"ifeval": {"path": "x", "max_new_tokns": 3}})
    assert params_from_dict(EvaluateParams, {"ifeval": {"max_new_tokens": "64"}}).ifeval.max_new_tokens == 64


# ---------------------------------------------------------------- smoke-test flag and headline


def test_only_the_embedded_judge_is_a_smoke_test(in_tmp):
    assert judge_is_smoke_test(EndpointParams("local", "models/teacher"))
    assert judge_is_smoke_test(EndpointParams("local", "./models/teacher/"))
    assert not judge_is_smoke_test(EndpointParams("openai", "models/teacher"))
    assert not judge_is_smoke_test(EndpointParams("local", "models/big-judge"))


def test_headline_holds_the_deciding_numbers():
    acc = {"accuracy": 0.25, "standard_error": 0.1, "n": 24}
    m = {"val_loss": 1.0, "stop_rate": 0.5, "answers": {"stop_rate": 0.5, "repetition_rate": 0.1},
         "ifeval": {"prompts": 24, "student": {"prompt_level_strict": acc},
                    "teacher": {"prompt_level_strict": {**acc, "accuracy": 0.5}}},
         "teacher_gap": {"nll_student": 2.0, "nll_base": 3.5, "nll_teacher": 1.5, "kl_student": 0.5, "kl_base": 2.0,
                         "gap_closed": 0.75, "tokens": 100},
         "judge": {"b": {"win_rate": 40.0, "n": 3}, "a": {"win_rate": 55.0, "n": 3}}, "judge_smoke_test_only": True}
    assert headline(m) == {"headline": {
        "ifeval_prompt_strict": {"student": 0.25, "teacher": 0.5},
        "nll_student": 2.0, "nll_base": 3.5, "nll_teacher": 1.5, "kl_student": 0.5, "kl_base": 2.0, "gap_closed": 0.75,
        "stop_rate": 0.5, "win_rate": {"a": 55.0, "b": 40.0}, "judge_smoke_test_only": True}}
    empty = headline({})["headline"]
    assert empty["ifeval_prompt_strict"] == {} and empty["gap_closed"] is None and not empty["judge_smoke_test_only"]


def test_readme_documents_the_headline_command():
    text = (ROOT / "README.md").read_text()
    assert "dvc exp show --drop '.*' --keep 'Experiment|^headline\\.'" in text
    assert "metrics/headline.json" in (ROOT / "dvc.yaml").read_text()


# ---------------------------------------------------------------- the stage on a tiny model


def test_main_on_a_tiny_local_student_base_and_teacher(in_tmp, tiny_model):
    """evaluate end to end, all local: a student, its base (= the teacher) and the teacher, a token folder whose
    meta.json has no `template` (older folders: chat), IFEval on 3 pinned prompts; a rerun asks no model."""
    import yaml
    from transformers import AutoTokenizer

    from stages.evaluate import main
    from tests.support.builders import make_data

    tok = AutoTokenizer.from_pretrained(tiny_model)
    make_data(in_tmp / "data" / "tokens", tok)
    assert "template" not in json.loads((in_tmp / "data/tokens/meta.json").read_text())
    student = make_tiny_model(in_tmp / "student", tok, seed=1)
    (in_tmp / "set.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "instruction": f"name a fruit {i}"}) + "\n"
                                              for i in range(3)))
    (in_tmp / "ife.jsonl").write_text("".join(SUBSET.read_text().splitlines(keepends=True)[:3]))
    local = {"backend": "local", "model": str(tiny_model)}
    (in_tmp / "params.yaml").write_text(yaml.safe_dump({
        "student": {"model": str(tiny_model)},
        "evaluate": {"model": str(student), "max_new_tokens": 4, "judge_max_new_tokens": 2,
                     "sets": {"s": {"path": "set.jsonl"}}, "teacher": local, "judge": local,
                     "ifeval": {"path": "ife.jsonl", "max_new_tokens": 5}}}))
    main()
    m = json.loads((in_tmp / "metrics/eval.json").read_text())
    h = json.loads((in_tmp / "metrics/headline.json").read_text())["headline"]
    assert m["ifeval"]["prompts"] == 3 and set(h["ifeval_prompt_strict"]) == {"student", "base", "teacher"}
    for who in ("student", "base", "teacher"):
        assert set(ifeval.METRICS) <= set(m["ifeval"][who])
        assert 0 <= m["ifeval"][who]["prompt_level_strict"]["accuracy"] <= 1
    g = m["teacher_gap"]
    assert g["prompts"] == 3 and g["teacher_scored"] and g["base_template"] == "chat"
    assert g["nll_student"] > 0 and g["kl_base"] == 0.0 and g["gap_closed"] is None  # the base is the teacher
    assert math.isclose(h["kl_student"], g["nll_student"] - g["nll_teacher"], abs_tol=1e-4)
    assert m["answers"]["n"] == 3 and m["answers"]["stop_rate"] == h["stop_rate"] == m["stop_rate"]
    assert h["judge_smoke_test_only"] is False and m["judge"]["s"]["smoke_test_only"] is False
    assert h["win_rate"] == {"s": m["judge"]["s"]["win_rate"]}
    # the base answers in the same format as the teacher here: one client, so its answers are the teacher's
    import polars as pl

    ife = pl.read_parquet(in_tmp / "data/eval/ifeval-00000.parquet")
    assert ife.height == 9 and sorted(set(ife["model"])) == ["base", "student", "teacher"]
    by = {w: ife.filter(ife["model"] == w)["response"].to_list() for w in ("base", "teacher")}
    assert by["base"] == by["teacher"]
    main()  # everything cached
    assert json.loads((in_tmp / "metrics/eval.json").read_text())["calls"]["model_calls"] == 0
    assert json.loads((in_tmp / "metrics/headline.json").read_text())["headline"] == h
