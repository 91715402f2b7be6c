"""End to end, each generate method through `dvc repro` against a fake OpenAI-compatible teacher.

seeds -> generate -> filter run as DVC stages (`-s`: the embedded teacher is not needed), the
fake answers each kind of prompt (bootstrap list, Yes/No, instances, chat answers, judge). Checks
the output schema that filter consumes, per-step metrics, and that a forced rerun is served
from the cache with zero teacher calls.

With `prompt_form: chat`, every method and the evaluate stage run against a strict chat-only fake
(`FakeOpenAI.strict`: /v1/completions is 404 for chat models, as on OpenAI) that replies in chat
style (`tests/support/chat_style.py`): preambles, restarted numbering, markdown, commentary.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from tests.support.chat_style import chat_style_reply
from tests.support.e2e import ran, set_params, sh
from tests.support.fake_openai import FakeOpenAI
from tests.support.method_teacher import WORDS, make_repo, reply
from tests.support.tiny import make_tiny_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def teacher():
    with FakeOpenAI(reply=reply) as srv:
        yield srv


def build(repo: Path) -> tuple[pl.DataFrame, dict, dict]:
    for stage in ["seeds", "generate", "filter"]:
        assert ran(sh(repo, "dvc", "repro", "-s", stage)) == [stage]
    tasks = pl.read_parquet(repo / "data/generated/tasks-00000.parquet")
    return tasks, json.loads((repo / "metrics/generate.json").read_text()), \
        json.loads((repo / "metrics/filter.json").read_text())


def rerun_is_cached(repo: Path, teacher: FakeOpenAI) -> None:
    before = len(teacher.requests)
    tasks = (repo / "data/generated/tasks-00000.parquet").read_bytes()
    sh(repo, "dvc", "repro", "-s", "-f", "generate")
    m = json.loads((repo / "metrics/generate.json").read_text())
    assert len(teacher.requests) == before and m["teacher_calls"] == 0 and m["cache_hits"] == m["requests"]
    assert (repo / "data/generated/tasks-00000.parquet").read_bytes() == tasks  # deterministic


def test_self_instruct_method(tmp_path, teacher):
    repo = make_repo(tmp_path, teacher, {"method": "self_instruct", "num_requests": 4,
                                         "self_instruct": {"requests_per_round": 2}})
    tasks, gm, fm = build(repo)
    steps = gm["steps"]
    assert steps["bootstrap"]["requests"] == 4 and steps["bootstrap"]["instructions_kept"] > 4
    assert sum(steps["classify"].values()) == steps["bootstrap"]["instructions_kept"]
    assert steps["instances"]["output_first"] == steps["classify"].get("yes", 0) > 0
    assert set(tasks["method"]) == {"self_instruct"} and tasks.height == steps["instances"]["instances_kept"]
    assert set(tasks.filter(pl.col("is_classification"))["output"]) == {"yes", "no"}
    assert tasks["is_classification"].null_count() > 0  # unknowns kept as unknown
    assert gm["teacher_calls"] == 4 + 2 * steps["bootstrap"]["instructions_kept"]
    assert fm["kept"] > 0 and fm["parsed"] == tasks.height
    rerun_is_cached(repo, teacher)


def test_responses_from_bootstrap(tmp_path, teacher):
    repo = make_repo(tmp_path, teacher, {"method": "responses", "num_requests": 2})
    tasks, gm, fm = build(repo)
    assert gm["steps"]["responses"]["prompts"] == gm["steps"]["bootstrap"]["instructions_kept"] == tasks.height > 0
    assert all(s.startswith("self_instruct:si-") for s in tasks["source"])
    assert all(o.startswith("A helpful answer") for o in tasks["output"])
    assert any(r["path"].endswith("/chat/completions") for r in teacher.requests)  # answers asked as chat
    assert fm["kept"] > 0
    rerun_is_cached(repo, teacher)


def test_responses_from_a_prompt_file_with_a_judge(tmp_path, teacher):
    repo = make_repo(tmp_path, teacher, {"method": "responses", "responses": {
        "prompts": "seeds/prompts/prompts.jsonl", "n": 2, "select": "judge"}})
    lines = [{"instruction": f"Plan a trip to the {w} with friends.", "input": ""} for w in WORDS[:6]]
    (repo / "seeds/prompts/prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    tasks, gm, fm = build(repo)
    r = gm["steps"]["responses"]
    assert r["prompts"] == 6 and r["requests"] == 12 and r["judged"] == 6 and tasks.height == 6
    assert list(tasks["item_index"]) == [1] * 6  # the judge said "2"
    assert list(tasks["source"]) == [f"seeds/prompts/prompts.jsonl:{i}" for i in range(1, 7)]
    assert gm["teacher_calls"] == 12 + 6 and fm["kept"] > 0
    rerun_is_cached(repo, teacher)
    # the prompt file is a dependency: editing it reruns generate
    (repo / "seeds/prompts/prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:3]))
    assert ran(sh(repo, "dvc", "repro", "-s", "generate")) == ["generate"]


# ---------------------------------------------------------------- a chat-only endpoint, replies in chat style


@pytest.fixture(scope="module")
def chat_teacher():
    # chat-only like OpenAI, and no models list: the endpoint check falls back to one tiny chat request
    with FakeOpenAI.strict(reply=chat_style_reply) as srv:
        yield srv


CHAT = {"model": "gpt-4o-mini", "prompt_form": "chat"}


def only_chat(requests: list[dict]) -> None:
    """Every request went to the chat endpoint (or the models API, 404 here), none to /v1/completions."""
    paths = {r["path"] for r in requests}
    assert requests and all(p == "/v1/chat/completions" or p.startswith("/v1/models") for p in paths), paths
    assert "/v1/chat/completions" in paths


def clean_instructions(tasks: pl.DataFrame) -> None:
    """No numbering, preamble, markdown or commentary left inside what was parsed."""
    for text in tasks["instruction"].to_list() + tasks["input"].to_list():
        assert not re.match(r"\s*(\d+\s*[.)]|[-*]\s|Sure|Here|Certainly)", text) and "**" not in text, text
    for text in tasks["output"].to_list():
        assert "Let me know" not in text and "I hope this helps" not in text, text


@pytest.mark.parametrize("case", ["self_instruct", "responses_bootstrap", "responses_file_judge", "evol_instruct"])
def test_every_method_over_a_chat_only_endpoint(tmp_path, chat_teacher, case):
    generate = {"self_instruct": {"method": "self_instruct", "num_requests": 2,
                                  "self_instruct": {"requests_per_round": 2}},
                "evol_instruct": {"method": "evol_instruct", "num_requests": 3, "evol_instruct": {"rounds": 1}},
                "responses_bootstrap": {"method": "responses", "num_requests": 2},
                "responses_file_judge": {"method": "responses", "system_prompt": "You are a helpful assistant.",
                                         "responses": {"prompts": "seeds/prompts/prompts.jsonl",
                                                       "n": 2, "select": "judge"}},
                }[case]
    repo = make_repo(tmp_path, chat_teacher, {**CHAT, **generate})
    if case == "responses_file_judge":
        lines = [{"instruction": f"Plan a trip to the {w} with friends.", "input": ""} for w in WORDS[:4]]
        (repo / "seeds/prompts/prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    before = len(chat_teacher.requests)
    tasks, gm, fm = build(repo)
    only_chat(chat_teacher.requests[before:])
    assert gm["failed"] == 0 and tasks.height > 0 and fm["kept"] > 0
    assert set(tasks["served_model"]) == {"gpt-4o-mini-2024-07-18"}
    assert set(tasks["system_fingerprint"]) == {"fp_fake0001"}
    clean_instructions(tasks)
    steps = gm["steps"]
    if "bootstrap" in steps:  # 7 tasks asked per request (15 - 8 shown); every one parsed
        assert steps["bootstrap"]["instructions_parsed"] == 7 * steps["bootstrap"]["requests"]
    if case == "self_instruct":
        assert steps["classify"].get("yes", 0) > 0 and steps["classify"].get("no", 0) > 0
        assert "unknown" not in steps["classify"]  # "Yes, it is." and "**No**" read
        assert steps["instances"]["instances_parsed"] > 0
    if case == "evol_instruct":  # every seed evolved, judged Not Equal, answered; provenance kept
        assert tasks.height == 3 and set(tasks["evol_round"]) == {1}
        assert tasks["parent_id"].str.starts_with("seed").all()
        assert not any(i.startswith('"') for i in tasks["instruction"].to_list())
    if case == "responses_file_judge":
        r = steps["responses"]
        assert r["judged"] == 4 and r["judge_unparsed"] == 0 and tasks.height == 4
        answers = [q for q in chat_teacher.requests[before:] if q["path"] == "/v1/chat/completions"
                   and q["body"]["messages"][-1]["content"].startswith("Plan a trip")]
        assert len(answers) == 8 and all(q["body"]["messages"][0] == {"role": "system", "content": "You are a helpful "
                                                                      "assistant."} for q in answers)
    rerun_is_cached(repo, chat_teacher)


def test_alpaca_and_evaluate_over_a_chat_only_endpoint(tmp_path, chat_teacher):
    """The whole chain after the teacher: alpaca over chat, then filter, ingest, tokenize, train a tiny
    student, and evaluate with the chat-only endpoint writing references and judging."""
    repo = make_repo(tmp_path, chat_teacher, {**CHAT, "num_requests": 6})
    make_tiny_model(repo / "models/teacher")  # the tokenizer (the teacher is the API)
    shutil.rmtree(repo / "models/pruned")
    make_tiny_model(repo / "models/pruned")  # the student's base: `prune`'s output, as the default student.model
    endpoint = {"backend": "openai", "model": "gpt-4o-mini", "base_url": chat_teacher.base_url}
    set_params(repo, train={"max_steps": 2, "batch_size": 2},
               evaluate={"score_base": False, "max_new_tokens": 8,
                         "sets": {"stillhouse": {"path": "seeds/eval/eval_prompts.jsonl", "limit": 3}},
                         "teacher": {**endpoint, "system_prompt": "Answer briefly."}, "judge": endpoint})
    sh(repo, "git", "add", "-A")  # train's dvclive needs a commit
    sh(repo, "git", "commit", "-qm", "init")
    before = len(chat_teacher.requests)
    tasks, gm, fm = build(repo)
    assert gm["failed"] == 0 and gm["steps"]["alpaca"]["items_unparsed"] == 0 and tasks.height >= 2 * 6
    clean_instructions(tasks)
    # one by one: not teacher_model or prune (the teacher is the API); capture skips for objective ce
    for stage in ["select", "ingest", "tokenize", "capture", "train", "evaluate"]:
        assert ran(sh(repo, "dvc", "repro", "-s", stage)) == [stage]
    only_chat(chat_teacher.requests[before:])
    em = json.loads((repo / "metrics/eval.json").read_text())
    js = em["judge"]["stillhouse"]
    assert js["n"] == 3 and js["judge_unparsed"] == 0 and em["calls"]["model_calls"] > 0
    judged = pl.read_parquet(repo / "data/eval/judgments-00000.parquet")
    assert judged["reference"].str.starts_with("**Answer:**").all()
    refs = [q for q in chat_teacher.requests[before:] if q["path"] == "/v1/chat/completions"
            and q["body"]["messages"][0] == {"role": "system", "content": "Answer briefly."}]
    ifeval = (repo / "seeds/eval/ifeval_subset.jsonl").read_text().count("\n")  # the teacher answers IFEval too
    assert len(refs) == 3 + ifeval and em["ifeval"]["prompts"] == ifeval and "teacher" in em["ifeval"]
