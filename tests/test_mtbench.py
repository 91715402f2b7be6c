"""MT-bench single-answer grading (stages/lib/evals/mtbench.py, stages/tools/mtbench.py): FastChat's rating
parser on its documented examples and on the real GPT-4 reviews in the reference data, show_result.py's
aggregation, FastChat's judge prompts on the 80 questions, and the whole grading through the project's model
client against the strict fake OpenAI server (cached: a rerun makes no call)."""

from __future__ import annotations

import json
import re

import pytest

from stages.lib.errors import StageError
from stages.lib.evals import mtbench
from tests.support.tiny import shared


def data():
    return (mtbench.load_questions(shared("fastchat", "mt_bench", "question.jsonl")),
            mtbench.load_references(shared("fastchat", "mt_bench", "reference_answer_gpt-4.jsonl")),
            mtbench.load_judge_prompts(shared("fastchat", "judge_prompts.jsonl")))


# --- the rating, read as FastChat reads it ----------------------------------------------------------------

def test_the_patterns_are_fastchats():
    # fastchat/llm_judge/common.py: one_score_pattern and one_score_pattern_backup, character for character
    assert mtbench.ONE_SCORE.pattern == "\\[\\[(\\d+\\.?\\d*)\\]\\]"
    assert mtbench.ONE_SCORE_BACKUP.pattern == "\\[(\\d+\\.?\\d*)\\]"
    assert mtbench.NEED_REF_CATS == ("math", "reasoning", "coding")


@pytest.mark.parametrize("judgment, rating", [
    ('The answer is fine. Rating: [[5]]', 5),  # the format the prompt itself shows: "Rating: [[5]]"
    ("Rating: [[8.5]]", 8.5),
    ("Rating: [[8.]]", 8.0),
    ("Rating: [8]", 8),  # the backup pattern
    ("[[10]] ... later [[3]]", 10),  # the first match
    ("A list [2] of points, then Rating: [[7]]", 7),  # [[N]] anywhere wins over an earlier [N]
    ("Rating: [[15]]", 15),  # not range-checked, as in FastChat
    ("Rating: 7/10", -1), ("Rating: [[ 7 ]]", -1), ("Rating: [[seven]]", -1), ("", -1), (None, -1),
    ("Rating: [[07]]", -1),  # FastChat's literal_eval raises on a zero-padded number; -1 here
])
def test_parse_rating_on_fastchats_documented_format(judgment, rating):
    got = mtbench.parse_rating(judgment)
    assert got == rating and type(got) is type(rating)  # literal_eval: "5" an int, "8.5" a float


def test_fastchats_parsers_on_the_real_gpt4_reviews_in_the_reference_data():
    """The reference data holds no single-answer (`[[rating]]`) judgments: its only reviews are the March 2023
    Vicuna eval's GPT-4 pairwise reviews, a score pair on the first line. On them FastChat's single-answer parser
    finds no rating (-1 for every one: nothing bracketed), and its pair parser (eval_gpt_review.py) gives the
    recorded score for 77 of 80; the 3 others open with a worked solution, not a score pair, and FastChat's
    parser gives [-1, -1] ("You must manually fix the score pair"): their recorded scores were fixed by hand."""
    path = shared("fastchat", "vicuna_eval_2023-03", "review_alpaca-13b_vicuna-13b.jsonl")
    reviews = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(reviews) == 80
    assert all(mtbench.parse_rating(r["text"]) == -1 for r in reviews)
    pairs = [(mtbench.parse_score_pair(r["text"]), r) for r in reviews]
    agree = [r for got, r in pairs if got == r["score"]]
    fixed = [r for got, r in pairs if got != r["score"]]
    assert len(agree) == 77
    assert all(mtbench.parse_score_pair(r["text"]) == [-1, -1] and r["reviewer_id"] == "gpt-4-0328-math"
               and r["text"].startswith("First,") for r in fixed)


# --- show_result.py's aggregation ---------------------------------------------------------------------------

def fastchat_scores(rows: list[dict]) -> dict:
    """show_result.py's `display_result_single` (scores != -1; turn 1, turn 2, all) and the category radar's
    mean over both turns (score >= 0), written with pandas as FastChat does."""
    pd = pytest.importorskip("pandas")
    df_all = pd.DataFrame(rows)
    df = df_all[["model", "score", "turn", "category"]]
    df = df[df["score"] != -1]
    first = df[df["turn"] == 1][["model", "turn", "score"]].groupby(["model", "turn"]).mean()
    second = df[df["turn"] == 2][["model", "turn", "score"]].groupby(["model", "turn"]).mean()
    avg = df[["model", "score"]].groupby(["model"]).mean()
    cats = {c: df_all[(df_all["category"] == c) & (df_all["score"] >= 0)]["score"].mean()
            for c in df_all["category"].unique()}
    return {"first_turn": float(first["score"].iloc[0]), "second_turn": float(second["score"].iloc[0]),
            "average": float(avg["score"].iloc[0]), "by_category": cats}


def test_summarize_matches_show_result():
    import random

    rng = random.Random(0)
    rows = [{"question_id": q, "category": mtbench.CATEGORIES[(q - 81) // 10], "model": "m", "turn": t,
             "score": rng.choice([-1, 1, 2, 5, 6.5, 7, 8, 9, 10])} for q in range(81, 161) for t in (1, 2)]
    ours, ref = mtbench.summarize(rows), fastchat_scores(rows)
    for k in ("first_turn", "second_turn", "average"):
        assert ours[k]["score"] == pytest.approx(ref[k], abs=1e-4)
    assert list(ours["by_category"]) == list(mtbench.CATEGORIES)
    for c, m in ours["by_category"].items():
        assert m["score"] == pytest.approx(ref["by_category"][c], abs=1e-4)
    assert ours["unparsed"] == sum(r["score"] == -1 for r in rows) and ours["judgments"] == 160
    assert ours["average"]["n"] == 160 - ours["unparsed"] and ours["average"]["standard_error"] > 0


# --- the judge prompts -----------------------------------------------------------------------------------------

def test_matches_and_prompts_are_gen_judgments():
    questions, refs, prompts = data()
    matches = mtbench.make_matches(questions, refs)
    assert len(questions) == 80 and len(matches) == 160
    names = [m.prompt_name for m in matches]
    assert names == (["single-v1"] * 50 + ["single-math-v1"] * 30 + ["single-v1-multi-turn"] * 50
                     + ["single-math-v1-multi-turn"] * 30)  # gen_judgment.py's order
    answers = {q.question_id: (f"A1 of {q.question_id}", f"A2 of {q.question_id}") for q in questions}
    math_t1 = next(m for m in matches if m.prompt_name == "single-math-v1")
    system, user = mtbench.judge_prompt(math_t1, answers[math_t1.question.question_id], prompts)
    assert system == "You are a helpful assistant." and math_t1.question.turns[0] in user
    assert math_t1.reference[0] in user and "A1 of" in user and "A2 of" not in user
    mt = next(m for m in matches if m.prompt_name == "single-math-v1-multi-turn")
    system, user = mtbench.judge_prompt(mt, answers[mt.question.question_id], prompts)
    assert "focus on the assistant's answer to the second question" in system
    assert all(x in user for x in (*mt.question.turns, *mt.reference, *answers[mt.question.question_id]))
    for m in matches:  # every placeholder filled
        _, user = mtbench.judge_prompt(m, answers[m.question.question_id], prompts)
        assert not re.search(r"\{(question|answer|ref_answer)(_\d)?\}", user)
    with pytest.raises(StageError, match="no reference answer for questions \\[101\\]"):
        mtbench.make_matches(questions, {k: v for k, v in refs.items() if k != 101})
    with pytest.raises(StageError, match="missing for questions \\[81\\]"):
        mtbench.grade(questions, {k: v for k, v in answers.items() if k != 81}, lambda p: [], refs, prompts)


# --- end to end through the model client, against the strict fake OpenAI server ---------------------------

def judge_reply(body: dict) -> str:
    """A judge that rates turn 1 of question q with 1 + q % 10, turn 2 with 10 - q % 7, and gives no rating
    for turn 2 of every question divisible by 9; it reads which answer it grades from the prompt."""
    user = body["messages"][-1]["content"]
    found = [(int(q), int(t)) for q, t in re.findall(r"answer to q(\d+) turn (\d)", user)]
    q, t = max(found, key=lambda x: x[1])
    if t == 2 and q % 9 == 0:
        return "I cannot rate this."
    return f"Explanation. Rating: [[{1 + q % 10 if t == 1 else 10 - q % 7}]]"


def expected_rows(questions) -> list[dict]:
    return [{"question_id": q.question_id, "category": q.category, "model": "m", "turn": t,
             "score": -1 if t == 2 and q.question_id % 9 == 0
             else (1 + q.question_id % 10 if t == 1 else 10 - q.question_id % 7)}
            for q in questions for t in (1, 2)]


def test_grading_end_to_end_through_the_model_client_is_cached(tmp_path, monkeypatch):
    from stages.lib.llm.client import open_client
    from stages.lib.llm.endpoint import EndpointParams
    from tests.support.fake_openai import FakeOpenAI

    questions, refs, prompts = data()
    answers = {q.question_id: tuple(f"answer to q{q.question_id} turn {t}" for t in (1, 2)) for q in questions}
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with FakeOpenAI.strict(models=["gpt-4o-mini"], api_key="sk-test", reply=judge_reply) as srv:
        endpoint = EndpointParams(backend="openai", model="gpt-4o-mini", base_url=srv.base_url)
        client = open_client(endpoint, tmp_path / "cache", role="judge")
        rows = mtbench.grade(questions, answers, mtbench.client_judge(client), refs, prompts, model="m",
                             judge="gpt-4o-mini")
        sent = [r for r in srv.requests if r["path"] == "/v1/chat/completions"]
        assert len(sent) == 160 and client.stats.teacher_calls == 160
        body = sent[0]["body"]
        assert body["temperature"] == 0 and body["max_tokens"] == 2048
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert body["messages"][0]["content"] == prompts["single-v1"]["system_prompt"]
        # a second client on the same cache: every judgment served from it, no request
        again = open_client(endpoint, tmp_path / "cache", role="judge")
        rows2 = mtbench.grade(questions, answers, mtbench.client_judge(again), refs, prompts, model="m",
                              judge="gpt-4o-mini")
        assert len([r for r in srv.requests if r["path"] == "/v1/chat/completions"]) == 160
        assert again.stats.cache_hits == 160 and rows2 == rows
    got = {(r["question_id"], r["turn"]): r["score"] for r in rows}
    want = expected_rows(questions)
    assert got == {(r["question_id"], r["turn"]): r["score"] for r in want}
    assert rows[0]["judge"] == ["gpt-4o-mini", "single-v1"] and rows[0]["judgment"].startswith("Explanation.")
    s, ref = mtbench.summarize(rows), fastchat_scores(want)
    assert s["unparsed"] == sum(q.question_id % 9 == 0 for q in questions) > 0
    assert s["average"]["score"] == pytest.approx(ref["average"], abs=1e-4)
    assert {c: m["score"] for c, m in s["by_category"].items()} == pytest.approx(ref["by_category"], abs=1e-4)


def test_the_tool_grades_an_answers_file(tmp_path, monkeypatch, capsys):
    from stages.tools.mtbench import main
    from tests.support.fake_openai import FakeOpenAI

    questions, _, _ = data()
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"question_id": q.question_id, "model_id": "m", "choices": [
        {"index": 0, "turns": [f"answer to q{q.question_id} turn {t}" for t in (1, 2)]}]}) + "\n" for q in questions))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.chdir(tmp_path)
    main([str(path), "--dry-run"])
    assert "80 questions, 160 judge calls" in capsys.readouterr().out
    with FakeOpenAI.strict(models=["judge"], api_key="sk-test", reply=judge_reply) as srv:
        argv = [str(path), "--judge-model", "judge", "--base-url", srv.base_url, "--model-name", "m",
                "--out", "j.jsonl", "--metrics", "m.json"]
        main(argv)
        out = capsys.readouterr().out
        with pytest.raises(StageError, match="exists; pass --force"):
            main(argv)
        main(argv + ["--force"])  # served from the cache
        assert len([r for r in srv.requests if r["path"] == "/v1/chat/completions"]) == 160
    m = json.loads((tmp_path / "m.json").read_text())
    ref = fastchat_scores(expected_rows(questions))
    assert m["average"]["score"] == pytest.approx(ref["average"], abs=1e-4)
    assert m["calls"]["cache_hits"] == 160 and m["calls"]["teacher_calls"] == 0
    assert len((tmp_path / "j.jsonl").read_text().splitlines()) == 160
    unparsed = sum(q.question_id % 9 == 0 for q in questions)
    assert "average:" in out and "  math:" in out and f"unparsed: {unparsed} of 160 judgments" in out
    assert (tmp_path / "data" / "mtbench_cache").is_dir()
