"""Reasoning traces: the normalizer on every provider form, and each form through the real client against a
strict fake of the server that sends it (tests/support/fake_openai.py cites the behaviour)."""

from __future__ import annotations

import pytest

from stages.lib.llm.backend import make_backend
from stages.lib.llm.cache import ResponseCache
from stages.lib.llm.client import ModelClient
from stages.lib.llm.endpoint import ApiParams, Price
from stages.lib.llm.openai_wire import RequestOptions, completion_from_body
from stages.lib.llm.types import REASONING_SOURCES, Sampling, TeacherStop, split_reasoning
from tests.support.fake_openai import FakeOpenAI, default_trace

KEY = "sk-stillhouse-test-" + "r" * 24
FAST = ApiParams(backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=2.0, max_attempts=2)
SAMPLING = Sampling(64, 0.6, 0.95)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


# ---------------------------------------------------------------- the normalizer


@pytest.mark.parametrize("text, message, expected", [
    ("42", {"content": "42", "reasoning_content": " 6*7 "}, ("6*7", "42", "reasoning_content")),
    ("42", {"content": "42", "reasoning": "6*7"}, ("6*7", "42", "reasoning")),
    ("<think>\n6*7\n</think>\n\n42", None, ("6*7", "42", "think_tags")),
    ("  <think>6*7</think>42", {"content": "x", "reasoning": None}, ("6*7", "42", "think_tags")),  # null field
    ("6*7\n</think>\n\n42", None, ("6*7", "42", "prefilled_think")),
    ("<think>6*7 and then the budget ran ou", None, ("6*7 and then the budget ran ou", "", "think_tags")),
    ("42", {"content": "42", "reasoning": "   "}, (None, "42", "none")),  # an empty field is no trace
    ("just 42", None, (None, "just 42", "none")),
    ("", None, (None, "", "none")),
    ("see <think> in the middle", None, (None, "see <think> in the middle", "none")),  # not a leading tag
])
def test_every_form_splits_into_reasoning_answer_and_source(text, message, expected):
    t = split_reasoning(text, message)
    assert (t.reasoning, t.answer, t.source) == expected
    assert t.source in REASONING_SOURCES


def test_both_field_names_the_new_one_wins_and_a_bad_field_is_malformed():
    t = split_reasoning("a", {"reasoning": "new", "reasoning_content": "old"})
    assert (t.reasoning, t.source) == ("new", "reasoning")
    with pytest.raises(TypeError):
        split_reasoning("a", {"reasoning": ["not", "text"]})
    body = {"choices": [{"message": {"content": "a", "reasoning": 3}}]}
    with pytest.raises(TypeError):  # the client retries it as a malformed body
        completion_from_body(body, "chat")


def test_the_wire_reader_carries_the_trace_and_its_source():
    body = {"choices": [{"message": {"content": "4", "reasoning_content": "2+2"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 9, "completion_tokens_details": {"reasoning_tokens": 6}}}
    c = completion_from_body(body, "chat")
    assert (c.text, c.reasoning, c.reasoning_source, c.completion_tokens, c.reasoning_tokens) == \
        ("4", "2+2", "reasoning_content", 9, 6)
    c = completion_from_body({"choices": [{"text": "2+2</think>4"}]}, "completion")
    assert (c.text, c.reasoning, c.reasoning_source) == ("4", "2+2", "prefilled_think")


# ---------------------------------------------------------------- through the client, per provider


def client_for(srv, model, tmp_path, form="chat", options=None, price=None, expect=True):
    b = make_backend("openai", model, form, srv.base_url, api=FAST, price=price, options=options)
    return ModelClient(lambda f: b, ResponseCache(tmp_path / "cache"), price=price, expect_reasoning=expect)


SERVERS = {
    "reasoning_content": (lambda **kw: FakeOpenAI.deepseek(api_key=KEY, **kw), "deepseek-reasoner"),
    "reasoning": (lambda **kw: FakeOpenAI.vllm_reasoning(**kw), "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
    "think_tags": (lambda **kw: FakeOpenAI(reasoning_form="think_tags", **kw), "r1-fireworks"),
    "prefilled_think": (lambda **kw: FakeOpenAI(reasoning_form="prefilled_think", **kw), "r1-prefill"),
}


@pytest.mark.parametrize("form", list(SERVERS))
def test_each_provider_form_is_captured_through_the_client(tmp_path, form):
    make, model = SERVERS[form]
    prompts = ["What is 6 times 7?", "What is 2 plus 2?"]
    with make() as srv:
        client = client_for(srv, model, tmp_path)
        records = client.ask(prompts, SAMPLING, "chat")
    for p, rec in zip(prompts, records):
        assert rec["reasoning_source"] == form
        assert rec["reasoning"] == default_trace({"messages": [{"role": "user", "content": p}]})
        assert rec["text"] == "answer to: " + p  # the answer only: no tag, no trace
        assert "<think>" not in rec["text"] and "</think>" not in rec["text"]
    assert client.stats.by_trace == {form: 2} and client.stats.reasoning_missing == 0
    m = client.metrics()
    assert m["reasoning_sources"] == {form: 2} and m["reasoning_missing"] == 0


def test_a_missing_trace_is_counted_and_the_answer_kept(tmp_path):
    with FakeOpenAI.vllm_reasoning(faults={1: "no_trace"}) as srv:
        client = client_for(srv, "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", tmp_path)
        records = client.ask(["a", "b", "c"], SAMPLING, "chat")
        assert all(records)  # nothing dropped
        assert sorted(r.get("reasoning_source", "none") for r in records) == ["none", "reasoning", "reasoning"]
        assert client.stats.reasoning_missing == 1 and client.metrics()["reasoning_missing"] == 1
        # served again from the cache: the counts are of the answers returned, cached ones too
        sent = srv.n_completions
        again = client_for(srv, "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", tmp_path)
        served = again.ask(["a", "b", "c"], SAMPLING, "chat")
        assert [(r["key"], r.get("reasoning")) for r in served] == [(r["key"], r.get("reasoning")) for r in records]
        assert srv.n_completions == sent
    assert again.stats.by_trace == {"reasoning": 2} and again.stats.reasoning_missing == 1


def test_without_expectation_no_answer_is_missing_and_metrics_keep_their_keys(tmp_path):
    with FakeOpenAI() as srv:
        client = client_for(srv, "plain", tmp_path, expect=False)
        client.ask(["a"], SAMPLING, "chat")
    assert client.stats.reasoning_missing == 0 and "reasoning_sources" not in client.metrics()


def test_vllm_sends_only_the_new_field(tmp_path):
    """vLLM removed `reasoning_content` (PR #33402): a reader of the old name alone would lose every trace."""
    with FakeOpenAI.vllm_reasoning() as srv:
        records = client_for(srv, "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", tmp_path).ask(["q"], SAMPLING, "chat")
    assert records[0]["reasoning_source"] == "reasoning"
    reply = completion_from_body({"choices": [{"message": {"content": "x", "reasoning": "t"}}]}, "chat")
    assert reply.reasoning == "t"


def test_deepseek_ignores_temperature_and_bills_the_trace(tmp_path):
    price = Price(0.55, 2.19)
    with FakeOpenAI.deepseek(api_key=KEY) as srv:
        client = client_for(srv, "deepseek-reasoner", tmp_path, price=price)
        rec = client.ask(["What is 6 times 7?"], Sampling(64, 0.7, 0.9), "chat")[0]
        sent = [r["body"] for r in srv.requests if r["path"].endswith("completions")]
    assert sent[0]["temperature"] == 0.7  # accepted (no effect), no 400
    n_trace = len(rec["reasoning"].split())
    assert rec["completion_tokens"] == 7 + n_trace and rec["reasoning_tokens"] == n_trace
    m = client.metrics()
    assert m["reasoning_tokens_called"] == n_trace
    assert m["cost_usd_called"] == round((11 * 0.55 + (7 + n_trace) * 2.19) / 1e6, 6)  # the trace billed as output


def test_deepseek_refuses_logprobs_and_the_run_stops_with_its_words(tmp_path):
    with FakeOpenAI.deepseek(api_key=KEY) as srv:
        client = client_for(srv, "deepseek-reasoner", tmp_path, options=RequestOptions(extra_body={"logprobs": True}))
        with pytest.raises(TeacherStop, match="does not support the parameter `logprobs`"):
            client.ask(["a", "b"], SAMPLING, "chat")


def test_a_completion_endpoint_parses_tags_in_the_text(tmp_path):
    with FakeOpenAI(reasoning_form="reasoning") as srv:  # vLLM's /v1/completions: no parser, raw text
        rec = client_for(srv, "r1", tmp_path, form="completion").ask(["2+2="], SAMPLING, "completion")[0]
    assert (rec["reasoning_source"], rec["text"]) == ("think_tags", "answer to: 2+2=")


def test_the_batch_api_reads_traces_the_same_way(tmp_path):
    with FakeOpenAI(reasoning_form="prefilled_think") as srv:
        b = make_backend("openai", "r1", "chat", srv.base_url, api=FAST)
        client = ModelClient(lambda f: b, ResponseCache(tmp_path / "cache"), batch_api=True, expect_reasoning=True)
        assert client.ask(["a", "b"], SAMPLING, "chat") == [None, None]  # submitted; collected on the next round
        records = client.ask(["a", "b"], SAMPLING, "chat")
        assert not [r for r in srv.requests if r["path"].endswith("completions")]  # only the Batch API was used
    assert [r["reasoning_source"] for r in records] == ["prefilled_think"] * 2
    assert client.stats.by_trace == {"prefilled_think": 2}


def test_the_deepseek_fake_is_as_strict_as_deepseek():
    """DeepSeek's reasoning-model guide: logprobs/top_logprobs are errors, a reasoning_content sent back is a 400,
    the sampling knobs are accepted and ignored."""
    import json
    import urllib.error
    import urllib.request

    def post(srv, body):
        req = urllib.request.Request(srv.base_url + "/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    user = [{"role": "user", "content": "hi"}]
    with FakeOpenAI.deepseek(api_key=KEY) as srv:
        status, body = post(srv, {"model": "deepseek-reasoner", "messages": user, "temperature": 1.3,
                                  "presence_penalty": 0.5})
        assert status == 200 and body["choices"][0]["message"]["reasoning_content"]
        assert "reasoning" not in body["choices"][0]["message"]
        for extra in ({"logprobs": True}, {"top_logprobs": 5}):
            status, body = post(srv, {"model": "deepseek-reasoner", "messages": user, **extra})
            assert status == 400 and body["error"]["type"] == "invalid_request_error", extra
        back = [*user, {"role": "assistant", "content": "x", "reasoning_content": "t"}, *user]
        assert post(srv, {"model": "deepseek-reasoner", "messages": back})[0] == 400
    with FakeOpenAI.vllm_reasoning() as srv:
        status, body = post(srv, {"model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "messages": user})
        assert status == 200 and "reasoning_content" not in body["choices"][0]["message"]
        assert body["choices"][0]["message"]["reasoning"]
