"""Response distillation: prompt files, n samples, selection rules, provenance."""

from __future__ import annotations

import json

import pytest

from stages.lib.errors import StageError
from stages.lib.formats import read_prompts
from stages.lib.generation.responses import ResponsesParams, answer, chat_prompt, parse_judge, pick_best_prompt
from stages.lib.llm.types import Sampling
from tests.support.tiny import shared

S = Sampling(64, 0.7, 0.9, seed=1)


def rec(prompt, text, finish="stop"):
    return {"prompt": prompt, "text": text, "finish_reason": finish, "key": "k", "response_id": "r",
            "teacher": "fake", "sampling": {}}


def test_read_prompts_every_format(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Add.", "input": "1 2", "output": "3"}]))
    (tmp_path / "s.json").write_text(json.dumps([{"id": "x", "conversations": [
        {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}]))
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": [{"role": "system", "content": "Be nice."},
                                                               {"role": "user", "content": "Why?"}]}) + "\n\n"
                                      + json.dumps({"prompt": "Say hi."}) + "\n")
    assert read_prompts(tmp_path / "a.json") == [{"instruction": "Add.", "input": "1 2",
                                                  "source": f"{tmp_path}/a.json[0]"}]
    assert read_prompts(tmp_path / "s.json")[0]["instruction"] == "Hi?"
    got = read_prompts(tmp_path / "m.jsonl")
    assert [g["instruction"] for g in got] == ["Why?", "Say hi."] and got[1]["source"].endswith("m.jsonl:3")
    assert len(read_prompts(tmp_path / "m.jsonl", limit=1)) == 1


def test_bad_prompt_files_name_file_and_position(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"promt": "typo"}\n')
    with pytest.raises(StageError, match=r"bad.jsonl:2: none of the fields"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(StageError, match=r"broken.jsonl:2: invalid JSON"):
        read_prompts(tmp_path / "broken.jsonl")
    with pytest.raises(StageError, match="not found"):
        read_prompts(tmp_path / "missing.json")


def test_real_prompt_sets():
    alpaca = read_prompts(shared("alpaca", "alpaca_data_first1727_flashmodels.json"))
    assert len(alpaca) == 1727 and sum(bool(p["input"]) for p in alpaca) > 500
    share = read_prompts(shared("sharegpt", "ShareGPT_V3_filtered_500.json"), limit=50)
    assert len(share) == 50 and all(p["instruction"] for p in share)


class Teacher:
    def __init__(self, answers, verdict="2"):
        self.answers, self.verdict, self.calls = answers, verdict, []

    def __call__(self, prompts, sampling, form):
        self.calls.append((list(prompts), sampling, form))
        if prompts and isinstance(prompts[0], str) and prompts[0].startswith("Which response"):
            return [rec(p, self.verdict) for p in prompts]
        return [self.answers(i, p) for i, p in enumerate(prompts)]


PROMPTS = [{"instruction": "Name a colour.", "input": "", "source": "f:1"},
           {"instruction": "Add the numbers.", "input": "2 3", "source": "f:2"}]


def test_one_sample_per_prompt_keeps_provenance():
    t = Teacher(lambda i, p: rec(p, f" answer {i} "))
    tasks, drops, m = answer(t, PROMPTS, ResponsesParams(), S)
    assert [x["output"] for x in tasks] == ["answer 0", "answer 1"] and not drops
    assert [x["source"] for x in tasks] == ["f:1", "f:2"] and tasks[1]["input"] == "2 3"
    assert t.calls[0][2] == "chat" and t.calls[0][0][1] == chat_prompt(PROMPTS[1]) == "Add the numbers.\n\n2 3"


def test_longest_and_truncated_and_empty():
    texts = {0: "short", 1: "a much longer answer", 2: "", 3: "cut off mid", 4: "fine", 5: "x"}
    t = Teacher(lambda i, p: rec(p, texts[i], "length" if i == 3 else "stop"))
    tasks, drops, m = answer(t, PROMPTS, ResponsesParams(n=3, select="longest"), S)
    assert [x["output"] for x in tasks] == ["a much longer answer", "fine"]
    assert m["dropped_by_reason"] == {"empty_output": 1, "not_selected_longest": 2, "truncated": 1}
    tasks, _, _ = answer(t, PROMPTS, ResponsesParams(n=3, select="longest", keep_truncated=True), S)
    assert [x["output"] for x in tasks] == ["a much longer answer", "cut off mid"]


def test_judge_picks_and_falls_back_when_unparseable():
    t = Teacher(lambda i, p: rec(p, f"answer {i}"), verdict=" 2")
    tasks, _, m = answer(t, PROMPTS, ResponsesParams(n=2, select="judge"), S)
    assert [x["output"] for x in tasks] == ["answer 1", "answer 3"] and m["judged"] == 2
    assert t.calls[1][0][0] == pick_best_prompt(PROMPTS[0], ["answer 0", "answer 1"])
    t = Teacher(lambda i, p: rec(p, f"answer {i}"), verdict="both are fine")
    tasks, _, m = answer(t, PROMPTS, ResponsesParams(n=2, select="judge"), S)
    assert [x["output"] for x in tasks] == ["answer 0", "answer 2"] and m["judge_unparsed"] == 2
    assert [parse_judge(x, 3) for x in ["3", "Response 1", "4", "", None]] == [2, 0, None, None, None]


def test_system_prompt_goes_with_every_answer_request_and_chat_verdicts_read():
    t = Teacher(lambda i, p: rec(p, f"answer {i}"))
    answer(t, PROMPTS, ResponsesParams(), S, system="You are a helpful assistant.")
    assert t.calls[0][0] == [("You are a helpful assistant.", chat_prompt(p)) for p in PROMPTS]
    t = Teacher(lambda i, p: rec(p, f"answer {i}"))
    answer(t, PROMPTS, ResponsesParams(), S)  # no system prompt: the prompt string alone, as before
    assert t.calls[0][0] == [chat_prompt(p) for p in PROMPTS]
    assert [parse_judge(x, 3) for x in ["**Response 2**", "Response 3 is the best.", "The best is **1**."]] == [1, 2, 0]
