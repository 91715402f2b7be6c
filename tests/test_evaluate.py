"""evaluate: eval sets, judge verdicts and orders, the win-rate arithmetic per set, and the
student answer cache keyed by checkpoint hash, decoding params and prompt."""

from __future__ import annotations

import json
import shutil

import pytest

from stages.evaluate import EvalSetParams, EvaluateParams, evaluate_sets, judge_all, make_sessions, read_eval_set
from stages.lib.errors import StageError
from stages.lib.judging.judge import combine, parse_verdict, preference, student_first, summarize
from stages.lib.llm.cache import ResponseCache
from stages.lib.llm.endpoint import EndpointParams
from stages.lib.llm.types import Sampling
from stages.lib.params import params_from_dict
from tests.support.tiny import shared


@pytest.mark.parametrize("text,want", [
    ("Output (a)", 1), ("output (B)", 2), ("  Output(b) is better because", 2), ("(a)", 1), ("b", 2),
    ("I think Output (b).", 2), ("Both are fine", None), ("", None), (None, None), ("about the answer", None)])
def test_parse_verdict(text, want):
    assert parse_verdict(text) == want


def test_preference_follows_what_was_shown():
    # reference shown first: output (a) = reference wins -> 1; student first: (a) = student -> 2
    assert preference(1, False) == 1.0 and preference(2, False) == 2.0
    assert preference(1, True) == 2.0 and preference(2, True) == 1.0
    assert preference(None, True) == 1.5
    # both orders: agree on the student, agree on the reference, disagree (position bias) -> draw
    assert combine(2, 1) == 2.0 and combine(1, 2) == 1.0 and combine(1, 1) == 1.5 and combine(None, 1) == 1.5


def test_random_order_is_seeded_and_balanced():
    flips = [student_first(0, "s", str(i)) for i in range(400)]
    assert flips == [student_first(0, "s", str(i)) for i in range(400)]
    assert 150 < sum(flips) < 250
    assert flips != [student_first(1, "s", str(i)) for i in range(400)]


def test_eval_sets_from_the_shared_data():
    si = read_eval_set("si", EvalSetParams(str(shared("self-instruct/predictions/text-davinci-003_predictions.jsonl")),
                                           "response"))
    koala = read_eval_set("koala", EvalSetParams(str(shared("koala/koala_test_set.jsonl"))))
    vicuna = read_eval_set("vicuna", EvalSetParams(str(shared("fastchat/vicuna_bench/question.jsonl"))))
    user = read_eval_set("user", EvalSetParams(str(shared("self-instruct/user_oriented_instructions.jsonl")), limit=5))
    assert (len(si), len(koala), len(vicuna), len(user)) == (252, 180, 80, 5)
    assert all(r["reference"] for r in si) and all(r["reference"] is None for r in koala + vicuna)
    first = json.loads(shared("fastchat/vicuna_bench/question.jsonl").read_text().splitlines()[0])
    assert vicuna[0]["instruction"] == first["turns"][0] and vicuna[0]["id"] == "1"
    raw = json.loads(shared("self-instruct/user_oriented_instructions.jsonl").read_text().splitlines()[0])
    assert user[0]["input"] == raw["instances"][0]["input"] != ""
    assert koala[3]["id"] == "koala_3"


def test_a_missing_reference_field_names_file_line_and_field(tmp_path):
    f = tmp_path / "set.jsonl"
    f.write_text('{"instruction": "a", "response": "x"}\n{"instruction": "b"}\n')
    with pytest.raises(StageError, match=r"set\.jsonl:2: field 'response'"):
        read_eval_set("s", EvalSetParams(str(f), "response"))
    with pytest.raises(StageError, match="file not found"):
        read_eval_set("s", EvalSetParams(str(tmp_path / "none.jsonl")))


def test_params_are_checked():
    with pytest.raises(StageError, match="judge_order"):
        params_from_dict(EvaluateParams, {"judge_order": "sometimes"})
    with pytest.raises(StageError, match="sets.x"):
        params_from_dict(EvaluateParams, {"sets": {"x": {"path": "a", "refernce": "teacher"}}})
    with pytest.raises(StageError, match="judge"):
        params_from_dict(EvaluateParams, {"judge": {"backend": "local", "model": "m", "api_key": "sk-no"}})


class FakeModels:
    """student/teacher/judge doubles. The judge prefers the longer output it is shown, except that
    with `biased` it always picks output (a). Records every prompt per role."""

    def __init__(self, answers: dict, refs: dict, biased: bool = False):
        self.answers, self.refs, self.biased, self.asked = answers, refs, biased, {}

    def __call__(self, role):
        def ask(prompts, sampling: Sampling):
            self.asked.setdefault(role, []).extend(prompts)
            out = []
            for q in prompts:
                if role == "judge":
                    a = q.split("## Output (a)\n\n")[1].split("\n\n## Output (b)")[0]
                    b = q.split("## Output (b)\n\n")[1].split("\n\n## Verdict")[0]
                    text = "Output (a)" if self.biased or len(a) >= len(b) else "Output (b)"
                    out.append({"text": text, "finish_reason": "stop", "completion_tokens": 3})
                else:
                    text = (self.answers if role == "student" else self.refs)[q]
                    out.append({"text": text, "finish_reason": "length" if text.endswith("...") else "stop",
                                "completion_tokens": len(text.split())})
            return out
        return ask


def write_set(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_evaluate_sets_end_to_end_on_doubles(tmp_path):
    rows = [{"id": f"q{i}", "instruction": f"question {i}"} for i in range(6)]
    with_refs = [{"id": "r0", "instruction": "say hi", "response": "hi"},
                 {"id": "r1", "instruction": "say bye", "response": "bye bye bye"}]
    p = EvaluateParams(sets={"mine": {"path": write_set(tmp_path / "a.jsonl", rows)},
                             "theirs": {"path": write_set(tmp_path / "b.jsonl", with_refs), "reference": "response"}})
    # student longer on q0-q2 (wins), shorter on q3-q4 (loses), identical on q5 (draw, no judge call)
    answers = {f"question {i}": ("a long student answer" if i < 3 else "short" if i < 5 else "same") for i in range(6)}
    answers.update({"say hi": "hello there friend", "say bye": "bye..."})
    refs = {f"question {i}": ("ref" if i < 3 else "a long reference answer" if i < 5 else "same") for i in range(6)}
    fake = FakeModels(answers, refs)
    df, m = evaluate_sets(p, fake)
    assert df["set"].to_list() == ["mine"] * 6 + ["theirs"] * 2 and df["id"].to_list()[:2] == ["q0", "q1"]
    mine = m["mine"]
    assert (mine["wins"], mine["losses"], mine["draws"], mine["identical"]) == (3, 2, 1, 1)
    assert mine["win_rate"] == pytest.approx(100 * 3.5 / 6, abs=1e-4)
    sd = (sum((s - 3.5 / 6) ** 2 for s in [1, 1, 1, 0, 0, 0.5]) / 5) ** 0.5
    assert mine["standard_error"] == pytest.approx(100 * sd / 6 ** 0.5, abs=1e-4)
    assert mine["position_flip_rate"] == 0.0 and mine["longer_wins_rate"] == 1.0 and mine["judge_unparsed"] == 0
    assert len(fake.asked["judge"]) == 2 * 5 + 2 * 2  # both orders, the identical pair not asked
    assert len(fake.asked["reference"]) == 6  # the other set brings its own references
    theirs = m["theirs"]
    assert theirs["wins"] == 1 and theirs["stop_rate"] == 0.5
    assert df.filter(df["set"] == "theirs")["reference_source"].to_list() == ["response", "response"]


def test_a_position_biased_judge_gives_draws_and_flips(tmp_path):
    rows = [{"id": f"q{i}", "instruction": f"question {i}"} for i in range(4)]
    p = EvaluateParams(sets={"s": {"path": write_set(tmp_path / "a.jsonl", rows)}})
    fake = FakeModels({f"question {i}": "student answer" for i in range(4)}, {f"question {i}": "ref" for i in range(4)},
                      biased=True)
    _, m = evaluate_sets(p, fake)
    assert m["s"]["draws"] == 4 and m["s"]["win_rate"] == 50.0 and m["s"]["position_flip_rate"] == 1.0
    p.judge_order = "random"
    fake.asked.clear()
    df, m = evaluate_sets(p, fake)
    assert len(fake.asked["judge"]) == 4 and m["s"]["position_flip_rate"] is None
    # one seeded order per prompt: a judge that always says (a) hands the win to whoever is shown first
    firsts = [student_first(p.seed, "s", f"q{i}") for i in range(4)]
    assert df["preference"].to_list() == [2.0 if f else 1.0 for f in firsts]


def test_summary_of_alpacaeval_annotations_reproduces_the_leaderboard():
    """The judged-rows summary gives AlpacaEval's Alpaca-7B figure from its GPT-4 annotations."""
    ann = json.loads(shared("alpaca_eval/alpaca-7b_vs_text_davinci_003_gpt4_annotations.json").read_text())
    rows = [{"reference": a["output_1"], "answer": a["output_2"], "preference": a["preference"], "judged": True,
             "order": "random", "verdict_ref_first": 1, "verdict_student_first": None, "finish_reason": "stop",
             "answer_tokens": 1} for a in ann]
    s = summarize(rows, "random")
    assert (round(s["win_rate"], 2), round(s["standard_error"], 2)) == (26.46, 1.54)


def test_student_answers_are_cached_by_checkpoint_decoding_and_prompt(tmp_path, tiny_model):
    model = tmp_path / "student"
    shutil.copytree(tiny_model, model)
    p = EvaluateParams(model=str(model), teacher={"backend": "local", "model": str(tiny_model)})
    cache_dir = tmp_path / "cache"
    greedy = Sampling(5, 0.0, 1.0, (), 0)

    def ask(prompts, sampling=greedy):
        sessions, made = make_sessions(p, ResponseCache(cache_dir))
        recs = sessions("student")(prompts, sampling)
        return recs, sum(s.stats.teacher_calls for s in made.values())

    first, calls = ask(["name a fruit", "write the list"])
    assert calls == 2 and all(r["finish_reason"] in ("stop", "length") for r in first)
    again, calls = ask(["name a fruit", "write the list", "a new prompt"])
    assert calls == 1 and [r["text"] for r in again[:2]] == [r["text"] for r in first]
    _, calls = ask(["name a fruit"], Sampling(6, 0.0, 1.0, (), 0))  # other decoding params
    assert calls == 1
    (model / "README.md").write_text("another checkpoint")  # the checkpoint's content changed
    _, calls = ask(["name a fruit"])
    assert calls == 1


def test_judge_all_leaves_identical_pairs_unjudged():
    rows = [{"set": "s", "id": "1", "question": "q", "reference": "same", "answer": "same "}]
    judge_all(rows, lambda prompts: pytest.fail("no call expected"), "both", 0)
    assert rows[0]["preference"] == 1.5 and rows[0]["order"] == "none"


def test_main_with_an_openai_compatible_teacher_and_judge(in_tmp, tiny_model, monkeypatch):
    """The stage end to end: a tiny local student, teacher and judge behind an OpenAI-compatible
    HTTP endpoint; metrics and judgments written; a rerun is served from the cache."""
    import polars as pl
    import yaml
    from transformers import AutoTokenizer

    from stages.evaluate import main
    from stages.lib.llm.types import TeacherStop
    from tests.support.builders import make_data
    from tests.support.fake_openai import FakeOpenAI, _last_user_text

    def reply(body):  # the teacher writes short references; the judge always prefers the student
        text = _last_user_text(body)
        if "## Verdict" in text:
            student = text.split("## Output (a)\n\n")[1].split("\n\n## Output (b)")[0]
            return "Output (a)" if not student.startswith("ref:") else "Output (b)"
        return "ref: " + text[:10]

    make_data(in_tmp / "data" / "tokens", AutoTokenizer.from_pretrained(tiny_model))
    write_set(in_tmp / "set.jsonl", [{"id": f"q{i}", "instruction": f"name a fruit {i}"} for i in range(3)])
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAI(reply=reply, models=["judge-model"]) as srv:
        endpoint = {"backend": "openai", "model": "judge-model", "base_url": srv.base_url}
        params = {"evaluate": {"model": str(tiny_model), "score_base": False, "max_new_tokens": 4,
                               "sets": {"s": {"path": "set.jsonl"}}, "teacher": endpoint, "judge": endpoint,
                               "ifeval": {"models": []}}}
        (in_tmp / "params.yaml").write_text(yaml.safe_dump(params))
        main()
        calls = len(srv.requests)
        m = json.loads((in_tmp / "metrics/eval.json").read_text())
        main()  # everything cached: no request, not even the endpoint check
        assert len(srv.requests) == calls == 1 + 3 + 2 * 3
        assert srv.requests[0]["path"] == "/v1/models/judge-model"  # checked once, before the first paid request
        # a misspelt judge: the stage stops with the server's words, in its error and its metrics
        params["evaluate"]["judge"] = {**endpoint, "model": "judge-modle"}
        (in_tmp / "params.yaml").write_text(yaml.safe_dump(params))
        with pytest.raises(TeacherStop, match="The model `judge-modle` does not exist"):
            main()
        error = json.loads((in_tmp / "metrics/eval.json").read_text())["error"]
        assert "The model `judge-modle` does not exist" in error
        params["evaluate"]["judge"] = endpoint
        (in_tmp / "params.yaml").write_text(yaml.safe_dump(params))
        assert all("test-key" not in json.dumps(r["body"]) for r in srv.requests)
    s = m["judge"]["s"]
    assert (s["n"], s["wins"], s["win_rate"], s["standard_error"], s["position_flip_rate"]) == (3, 3, 100.0, 0.0, 0.0)
    assert m["val_loss"] > 0 and m["calls"]["model_calls"] == 3 + 3 + 6
    df = pl.read_parquet(in_tmp / "data/eval/judgments-00000.parquet")
    assert df["reference"].str.starts_with("ref: ").all() and df["preference"].to_list() == [2.0, 2.0, 2.0]


def test_no_eval_sets_means_no_calls(tmp_path):
    p = EvaluateParams(sets={})
    df, m = evaluate_sets(p, lambda role: lambda prompts, sampling: pytest.fail("no call expected") if prompts else [])
    assert df.height == 0 and m == {} and "preference" in df.columns


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_the_student_is_evaluated_on_the_prompt_it_was_trained_on(tmp_path, tiny_model, template):
    """The same task, with stray whitespace, through both paths: ingest's conversation and tokenize's
    arrays (the trained prompt = the tokens before the first trained one), and evaluate's eval-set row,
    question and the student's local backend (its tokenizer carries the training template, as train
    saves it). The token ids and the text are identical."""
    import shutil

    from transformers import AutoTokenizer

    from stages.lib.formats import to_messages
    from stages.lib.llm.backend import make_backend
    from stages.lib.tokens.templates import export_tokenizer
    from stages.tokenize import TokenizeParams, tokenize_conversations

    task = {"id": "t0", "instruction": "  Sort the numbers in ascending order.\n", "input": "\n3, 1, 2  ",
            "output": "1, 2, 3"}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    [(_, msgs)] = to_messages(task, "generated")  # ingest
    by_split, _ = tokenize_conversations([{"id": "c", "messages": msgs}], tok,
                                         TokenizeParams(template=template, val_fraction=0.0))
    [(_, ids, mask)] = by_split["train"]
    trained = ids[: mask.index(1)]

    student = tmp_path / "student"
    shutil.copytree(tiny_model, student)
    export_tokenizer(AutoTokenizer.from_pretrained(tiny_model), template).save_pretrained(student)
    write_set(tmp_path / "set.jsonl", [{"id": "q0", "instruction": task["instruction"], "input": task["input"]}])
    asked: dict[str, list[str]] = {}

    def sessions(role):
        def ask(prompts, sampling):
            asked.setdefault(role, []).extend(prompts)
            return [{"text": "same", "finish_reason": "stop", "completion_tokens": 1} for _ in prompts]
        return ask

    evaluate_sets(EvaluateParams(model=str(student), sets={"s": {"path": str(tmp_path / "set.jsonl")}}), sessions)
    backend = make_backend("local", str(student), "chat")  # how make_sessions asks the student
    shown = backend.render(asked["student"][0])
    assert backend.tok(shown, add_special_tokens=False)["input_ids"] == trained
    assert shown == tok.decode(trained)
    assert "Sort the numbers in ascending order.\n\n3, 1, 2" in shown and "  Sort" not in shown


def test_the_judge_calls_and_their_cost_are_printed_before_the_first_call(tmp_path, capsys):
    """The preview line comes before the judge is asked, counts every call it will send (both orders, the
    identical pair left out) and prices them at the model's list price; a local judge costs nothing."""
    from stages.evaluate import judge_preview
    from stages.lib.llm.endpoint import PRICES

    rows = [{"id": f"q{i}", "instruction": f"question {i}"} for i in range(3)]
    p = EvaluateParams(sets={"s": {"path": write_set(tmp_path / "a.jsonl", rows)}})
    fake = FakeModels({f"question {i}": "student" if i else "same" for i in range(3)},
                      {f"question {i}": "ref" if i else "same" for i in range(3)})
    judge = fake("judge")

    def judged(prompts, sampling):
        assert "evaluate: judge models/teacher: 4 calls" in capsys.readouterr().err  # printed first
        return judge(prompts, sampling)

    evaluate_sets(p, lambda role: judged if role == "judge" else fake(role))
    prompts = ["x" * 4000, "y" * 400]
    api = EndpointParams(backend="openai", model="gpt-4o", base_url=None)
    want = PRICES["gpt-4o"].cost(1100, 2 * 16)
    assert f"at most ${want:.4f}" in judge_preview(prompts, api, 16) and "2 calls" in judge_preview(prompts, api, 16)
    assert "no charge" in judge_preview(prompts, p.judge, 16)
    assert "unknown" in judge_preview(prompts, EndpointParams(backend="openai", model="my-model"), 16)
