"""Evol-Instruct: each elimination rule on crafted cases, the seeded operation draw, provenance through two rounds."""

from __future__ import annotations

import re

import pytest

from stages.lib.errors import StageError
from stages.lib.generation.evol_instruct import (
    EQUAL_PROMPT,
    OPERATIONS,
    EvolParams,
    answer_prompt,
    answer_reason,
    draw_operation,
    evolve,
    evolve_prompt,
    instruction_reason,
    parse_equal,
)
from stages.lib.llm.types import Sampling
from stages.lib.params import params_from_dict


def rec(prompt: str, text: str, finish: str = "stop") -> dict:
    return {"prompt": prompt, "text": text, "finish_reason": finish, "key": f"k{abs(hash(prompt + text))}",
            "response_id": "r", "teacher": "fake", "sampling": {}}


@pytest.mark.parametrize("text, finish, why", [
    ("#Rewritten Prompt#: List three fruits that are red.", "stop", "copies_evolving_prompt"),
    ("Rewrite the given prompt so that it asks for red fruits.", "stop", "copies_evolving_prompt"),
    ("#Created Prompt#:\nName a rare citrus fruit.", "stop", "copies_evolving_prompt"),
    ("   ", "stop", "empty_instruction"),
    ("List three red fruits and explain why each one", "length", "truncated_instruction"),
    ("List three red fruits and explain, step by step, why each is red.", "stop", None),
])
def test_instruction_elimination(text, finish, why):
    assert instruction_reason(text, finish) == why


@pytest.mark.parametrize("verdict, equal", [
    ("Equal", True), (" equal.", True), ("Not Equal", False), ("NOT EQUAL\nThe second adds a constraint.", False),
    ("They are different.", False), ("Hmm, hard to say.", None), ("", None), (None, None),
])
def test_parse_equal(verdict, equal):
    assert parse_equal(verdict) is equal


def test_answer_elimination():
    assert answer_reason("I'm sorry, but I cannot help with that.", "stop") == "apology"
    long_apology = "Sorry for the long answer. " + "Red fruits include apples and cherries. " * 14
    assert len(long_apology.split()) >= 80 and answer_reason(long_apology, "stop") is None
    assert answer_reason("The, and of it... !!", "stop") == "only_stop_words"
    assert answer_reason("?!... --", "stop") == "only_stop_words"
    assert answer_reason("", "stop") == "empty_answer"
    assert answer_reason("Apples, cherries and strawberries.", "length") == "answer_truncated"
    assert answer_reason("Apples, cherries and strawberries.", "stop") is None
    assert answer_reason("Sorry", "stop", apology_max_words=0) is None  # the word limit is the param


def test_prompts_and_the_seeded_draw():
    p = evolve_prompt("Name a fruit.", "constraints")
    assert p.startswith("I want you act as a Prompt Rewriter.")
    assert p.endswith("#The Given Prompt#:\nName a fruit.\n#Rewritten Prompt#:\n")
    assert "add one more constraints/requirements" in p
    assert evolve_prompt("Name a fruit.", "breadth").endswith("#Given Prompt#:\nName a fruit.\n#Created Prompt#:\n")
    draws = [draw_operation(list(OPERATIONS), 7, 1, f"seed-{i}") for i in range(300)]
    assert draws == [draw_operation(list(OPERATIONS), 7, 1, f"seed-{i}") for i in range(300)]  # reproducible
    assert set(draws) == set(OPERATIONS)
    assert draws != [draw_operation(list(OPERATIONS), 8, 1, f"seed-{i}") for i in range(300)]  # the seed matters
    assert answer_prompt("Name a fruit.", "chat") == ("Name a fruit.", ())
    text, stop = answer_prompt("Name a fruit.", "completion")
    assert text.endswith("### Instruction:\nName a fruit.\n\n### Response:\n") and stop == ("###",)
    with pytest.raises(StageError, match="operations"):
        params_from_dict(EvolParams, {"operations": ["deepen", "shorten"]}, "generate.evol_instruct")


class Teacher:
    """A fake teacher: evolves by appending a clause, judges Not Equal, answers; scripted failures by text."""

    def __init__(self):
        self.calls: list[tuple[str, int, str]] = []

    def __call__(self, prompts, sampling, form):
        self.calls.append((prompts[0][:20] if prompts else "", len(prompts), form))
        out = []
        for p in prompts:
            if p.startswith("I want you act as a Prompt"):
                inst = re.search(r"Prompt#:\n(.*)\n#(?:Rewritten|Created) Prompt#:\n$", p, re.S).group(1)
                if "cat" in inst and "Given Prompt#:" in p and "Created" not in p and "dog" not in inst:
                    out.append(rec(p, "#Rewritten Prompt#: " + inst))  # leaks the rewriting instructions
                elif "moon" in inst:
                    out.append(rec(p, inst + " (same)"))  # judged equal below
                else:
                    out.append(rec(p, inst + f" Also explain step {inst.count('step') + 1}."))
            elif p.startswith("Here are two Instructions"):
                out.append(rec(p, "Equal" if "(same)" in p else "Not Equal"))
            else:
                out.append(rec(p, "I am sorry, I cannot." if "sorry" in p else "A careful answer with real content."))
        return out


def test_provenance_through_two_rounds_and_failed_parents_stay_in_the_pool():
    pool = [{"id": "s1", "instruction": "Describe a river.", "input": ""},
            {"id": "s2", "instruction": "Describe the moon.", "input": ""},
            {"id": "s3", "instruction": "Summarize this text.", "input": "Rivers flow."}]
    e = EvolParams(rounds=2, operations=["deepen", "reasoning"])
    teacher = Teacher()
    tasks, drops, m = evolve(teacher, pool, e, Sampling(64, 0.7, 0.9, (), 1), "chat", seed=3)
    r1 = [t for t in tasks if t["evol_round"] == 1]
    r2 = [t for t in tasks if t["evol_round"] == 2]
    assert {t["parent_id"] for t in r1} == {"s1", "s3"}  # s2's evolution says nothing new
    assert [d["reason"] for d in drops if d["parent_id"] == "s2"] == ["no_new_information"] * 2
    # round 2 evolves round 1's children (and s2 again, which fails again)
    assert sorted(t["parent_id"] for t in r2) == sorted(t["id"] for t in r1)
    for t in r2:
        parent = next(x for x in r1 if x["id"] == t["parent_id"])
        assert t["source"] == parent["source"] == f"evol_instruct:{parent['parent_id']}"
        assert t["parent_instruction"] == parent["instruction"] and t["instruction"].startswith(parent["instruction"])
        assert t["evol_operation"] == draw_operation(e.operations, 3, 2, parent["id"])
    s3 = next(t for t in r1 if t["parent_id"] == "s3")
    assert s3["parent_instruction"] == "Summarize this text.\n\nRivers flow."  # the input is evolved with it
    assert m["rounds"][0]["kept"] == 2 and m["rounds"][1]["kept"] == 2 and m["kept"] == 4
    assert len({t["id"] for t in tasks}) == 4
    assert all(form == "chat" for *_, form in teacher.calls)


def test_each_rule_drops_with_its_reason_in_a_run():
    pool = [{"id": "cat", "instruction": "Describe a cat.", "input": ""},
            {"id": "sorry", "instruction": "Say sorry to a friend.", "input": ""},
            {"id": "ok", "instruction": "Describe a dog.", "input": ""}]
    tasks, drops, _ = evolve(Teacher(), pool, EvolParams(rounds=1, operations=["constraints"]),
                          Sampling(64, 0.7, 0.9, (), 1), "completion", seed=0)
    why = {d["parent_id"]: d["reason"] for d in drops}
    assert why == {"cat": "copies_evolving_prompt", "sorry": "apology"}
    assert [t["parent_id"] for t in tasks] == ["ok"] and tasks[0]["evol_operation"] == "constraints"
    assert all(d["step"] == "evol_round_1" and d["detail"] for d in drops)


def test_equality_judge_can_be_off():
    pool = [{"id": "m", "instruction": "Describe the moon.", "input": ""}]
    teacher = Teacher()
    tasks, drops, _ = evolve(teacher, pool, EvolParams(rounds=1, judge_equal=False), Sampling(64, 0.7, 0.9, (), 1),
                          "chat", seed=0)
    assert len(tasks) == 1 and not drops and not any(c[0].startswith("Here are two") for c in teacher.calls)
    assert EQUAL_PROMPT.startswith("Here are two Instructions")


def test_generate_stage_writes_provenance_columns(in_tmp):
    """`python -m stages.generate` with method evol_instruct against a loopback teacher: task and drop
    shards carry parent id, operation and round."""
    import shutil

    import polars as pl

    from stages import generate
    from stages.lib.io import write_shards
    from tests.support.fake_openai import FakeOpenAI, _last_user_text
    from tests.support.tiny import ROOT, write_params

    def reply(body):
        text = _last_user_text(body)
        if text.startswith("I want you act as a Prompt"):
            inst = re.search(r"Prompt#:\n(.*)\n#(?:Rewritten|Created) Prompt#:\n$", text, re.S).group(1)
            return "#Rewritten Prompt#: x" if "poem" in inst.lower() else inst + " Use exactly three sentences."
        if text.startswith("Here are two Instructions"):
            return "Not Equal"
        return "A specific, useful answer."

    seeds = [{"id": f"seed_{i}", "name": f"t{i}", "instruction": inst, "instances": [{"input": "", "output": "o"}],
              "is_classification": False} for i, inst in enumerate(["Write a poem about rain.", "Explain tides.",
                                                                     "List three prime numbers."])]
    write_shards(pl.DataFrame(seeds), in_tmp / "data/seeds")
    shutil.copytree(ROOT / "seeds/prompts", in_tmp / "seeds/prompts")
    with FakeOpenAI(reply=reply) as srv:
        write_params(in_tmp / "params.yaml", {"generate": {
            "method": "evol_instruct", "teacher": {"backend": "openai", "model": "fake", "base_url": srv.base_url,
                                                   "prompt_form": "chat"},
            "num_requests": 3, "evol_instruct": {"rounds": 2}}, "filter": {}})
        generate.main()
    tasks = pl.read_parquet(in_tmp / "data/generated/tasks-00000.parquet")
    drops = pl.read_parquet(in_tmp / "data/generated/unparsed-00000.parquet")
    assert tasks.height == 4 and set(tasks["method"]) == {"evol_instruct"}
    assert sorted(tasks.filter(pl.col("evol_round") == 1)["parent_id"]) == ["seed_1", "seed_2"]
    r1_ids = set(tasks.filter(pl.col("evol_round") == 1)["id"])
    assert set(tasks.filter(pl.col("evol_round") == 2)["parent_id"]) == r1_ids
    assert set(drops["reason"]) == {"copies_evolving_prompt"} and set(drops["parent_id"]) == {"seed_0"}
    assert drops.height == 2 and sorted(drops["evol_round"]) == [1, 2]
    assert all(op in OPERATIONS for op in tasks["evol_operation"])
