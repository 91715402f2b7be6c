"""generate: prompt encoding, per-item parsing, request keys, the response cache."""

from __future__ import annotations

import json

import pytest

from stages.generate import GenerateParams
from stages.lib.generation.alpaca import build_prompts, encode_prompt, parse_response, rows_from_records
from stages.lib.llm.cache import ResponseCache, assign_keys, request_key
from stages.lib.llm.client import run_requests
from stages.lib.llm.types import Completion, Sampling

SEEDS = [
    {"id": f"s{i}", "instruction": f"Task number {i}:  do  thing {i}",
     "instances": [{"input": "" if i % 2 else f"in {i}", "output": f"out {i}"}]}
    for i in range(10)
]
S = Sampling(64, 0.7, 0.9)


def test_encode_prompt_is_alpaca_format():
    p = encode_prompt("HEADER\n", SEEDS[:2])
    assert p == (
        "HEADER\n###\n1. Instruction: Task number 0: do thing 0\n1. Input:\nin 0\n1. Output:\nout 0\n"
        "###\n2. Instruction: Task number 1: do thing 1\n2. Input:\n<noinput>\n2. Output:\nout 1\n"
        "###\n3. Instruction:"
    )


def test_prompts_are_reproducible_and_stable_when_adding_requests():
    a, shown_a = build_prompts(SEEDS, "H", 4, 3, 42, "completion")
    b, shown_b = build_prompts(SEEDS, "H", 6, 3, 42, "completion")
    assert a == b[:4] and shown_a == shown_b[:4]
    assert len(set(a)) > 1  # different requests sample different examples
    c, _ = build_prompts(SEEDS, "H", 4, 3, 7, "completion")
    assert c != a


RESPONSE = """ Classify the animal as mammal or bird.
4. Input:
sparrow
4. Output:
bird
###
5. Instruction: Name three primary colours.
5. Input:
<noinput>
5. Output:
Red, blue and yellow.
###
6. Instruction: This item forgot its fields.
###
7. Instruction: Translate to French.
7. Input:
Good morning
7. Output:
Bonjour
###
8. Instruction: Cut off in the mid"""


def test_parse_keeps_good_items_around_a_malformed_one():
    items = parse_response(RESPONSE, 4, "length")
    assert [i["reason"] for i in items] == [None, None, "missing_input", None, "truncated"]
    good = [i for i in items if not i["reason"]]
    assert good[0] == {**good[0], "instruction": "Classify the animal as mammal or bird.",
                       "input": "sparrow", "output": "bird"}
    assert good[1]["input"] == "" and good[1]["output"] == "Red, blue and yellow."
    assert good[2]["output"] == "Bonjour"


def test_parse_keeps_last_item_when_the_teacher_stopped():
    text = RESPONSE.rsplit("###", 1)[0]
    items = parse_response(text, 4, "stop")
    assert items[-1]["output"] == "Bonjour" and items[-1]["reason"] is None


def test_parse_missing_output_and_chat_style_numbering():
    text = ("1. Instruction: Add the numbers.\n1. Input:\n2 and 3\n1. Output:\n5\n\n"
            "2. Instruction: Only input here.\n2. Input:\nx")
    items = parse_response(text, 4, "stop")
    assert items[0]["output"] == "5" and items[0]["input"] == "2 and 3"
    assert items[1]["reason"] == "missing_output"


def test_request_keys_depend_on_every_part_and_count_draws():
    base = request_key("t", "completion", "p", S, 0)
    assert base != request_key("t2", "completion", "p", S, 0)
    assert base != request_key("t", "chat", "p", S, 0)
    assert base != request_key("t", "completion", "p2", S, 0)
    assert base != request_key("t", "completion", "p", Sampling(64, 0.8, 0.9), 0)
    assert base != request_key("t", "completion", "p", Sampling(64, 0.7, 0.9, seed=1), 0)
    reqs = assign_keys(["p", "q", "p"], "t", "completion", S)
    assert reqs[0].key == base and reqs[2].key == request_key("t", "completion", "p", S, 1)
    assert len({r.key for r in reqs}) == 3


class CountingBackend:
    """Test double: answers with a fixed one-item response and counts prompts it was sent."""

    name = "fake"
    teacher_id = "fake:1"
    request_fields: dict = {}
    prompt_form = "completion"

    def __init__(self):
        self.calls = 0

    def complete(self, prompts):
        self.calls += len(prompts)
        return [Completion(" Do X now.\n4. Input:\n<noinput>\n4. Output:\nDone.\n###", "stop", 10, 5) for _ in prompts]

    def check(self):
        pass

    def run(self, requests, sampling, on_done, report):
        for i in range(0, len(requests), 2):
            batch = requests[i : i + 2]
            for r, c in zip(batch, self.complete([r.prompt for r in batch])):
                on_done(r, c, None)


def test_cache_makes_reruns_free_and_survives_restart(tmp_path):
    prompts = [f"prompt {i}" for i in range(5)]
    reqs = assign_keys(prompts, "fake:1", "completion", S)
    backend = CountingBackend()
    recs, stats = run_requests(reqs, backend, ResponseCache(tmp_path / "c"), S)
    assert backend.calls == 5 and stats.teacher_calls == 5 and stats.cache_hits == 0
    files = sorted((tmp_path / "c").glob("responses-*.jsonl"))
    assert sum(len(f.read_text().splitlines()) for f in files) == 5
    # a new process (new cache object) with two more prompts pays only for those two
    reqs2 = assign_keys(prompts + ["prompt 5", "prompt 6"], "fake:1", "completion", S)
    recs2, stats2 = run_requests(reqs2, backend, ResponseCache(tmp_path / "c"), S)
    assert backend.calls == 7 and stats2.cache_hits == 5 and stats2.teacher_calls == 2
    assert [r["text"] for r in recs2[:5]] == [r["text"] for r in recs]
    assert all("OPENAI" not in json.dumps(r) for r in recs2)


@pytest.mark.parametrize("role", ["judge", "student", "reference"])
def test_progress_lines_name_the_role_asked(tmp_path, capsys, role):
    """evaluate's student answers, references and judge calls, and select's judge, are labelled as what they
    are, not all as `teacher:`."""
    from stages.lib.llm.client import ModelClient

    client = ModelClient(lambda form: CountingBackend(), ResponseCache(tmp_path / "c"), role="judge")
    client.ask(["a", "b"], S, "completion", role)
    err = capsys.readouterr().err
    assert f"{role}: 2 requests, 0 cached" in err and "teacher:" not in err


def test_cache_keeps_what_was_bought_before_a_crash(tmp_path):
    class Crashing(CountingBackend):
        def complete(self, prompts):
            if self.calls >= 4:
                raise RuntimeError("connection lost")
            return super().complete(prompts)

    reqs = assign_keys([f"p{i}" for i in range(8)], "fake:1", "completion", S)
    try:
        run_requests(reqs, Crashing(), ResponseCache(tmp_path / "c", fsync_every_s=100), S)
    except RuntimeError:
        pass
    assert len(ResponseCache(tmp_path / "c").entries) == 4


def test_rows_carry_provenance(tmp_path):
    reqs = assign_keys(["p0"], "fake:1", "completion", S)
    recs, _ = run_requests(reqs, CountingBackend(), ResponseCache(tmp_path), S)
    tasks, unparsed = rows_from_records(recs, [["s1", "s2", "s3"]], 4)
    assert unparsed == []
    (t,) = tasks
    assert t["instruction"] == "Do X now." and t["input"] == "" and t["output"] == "Done."
    assert t["cache_key"] == reqs[0].key and t["teacher_model"] == "fake" and t["in_context_ids"] == ["s1", "s2", "s3"]
    assert json.loads(t["sampling"]) == {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "stop": [], "seed": 0}



def test_prompt_files_from_the_wild_are_repaired_and_oversized_prompts_skipped(tmp_path):
    """generate's prompt files (and evaluate's eval sets, ingest's decontamination sets) read through here."""
    import pytest as _pytest

    from stages.lib.errors import StageError
    from stages.lib.formats import read_prompts
    from stages.lib.text.clean import read_text

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\n".join([
        json.dumps({"instruction": "Name a \ud800 colour."}).encode(),   # lone surrogate as a JSON escape
        json.dumps({"instruction": "Name a fruit."}).encode().replace(b"fruit", b"fr\xffuit"),  # invalid UTF-8
        json.dumps({"instruction": "Name\u0000 a tree."}).encode(),      # NUL
        json.dumps({"instruction": "x " * 2_600_000}).encode(),          # a 5 MB prompt
        json.dumps({"instruction": "Name a river."}, ensure_ascii=False).encode(),
    ]) + b"\n")
    stats = {}
    got = read_prompts(path, stats=stats)
    assert [g["instruction"] for g in got] == ["Name a \ufffd colour.", "Name a fr\ufffduit.",
                                               "Name a tree.", "Name a river."]
    assert [g["source"].rsplit(":", 1)[1] for g in got] == ["1", "2", "3", "5"]
    assert stats == {"repaired": 3, "too_long": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"nope": 1}\n')
    with _pytest.raises(StageError, match=r"bad.jsonl:2"):  # a structural error still names file and line
        read_prompts(bad)
    header = tmp_path / "prompt.txt"
    header.write_bytes(b"\xef\xbb\xbfList tasks\x00 \xff.\n")  # BOM, NUL, invalid byte
    assert read_text(header) == "List tasks \ufffd.\n"


# ---------------------------------------------------------------- chat form

from stages.lib.generation.alpaca import ALPACA_SYSTEM, encode_chat_prompt, parse_chat_response  # noqa: E402

CHAT_REPLY = """Sure! Here are more tasks in the same format:

###
**4. Instruction:** Classify the animal as mammal or bird.
**4. Input:**
sparrow
**4. Output:**
bird

---

### 5. Instruction: Name three primary colours.
5. Input:
<noinput>
5. Output:
Red, blue and yellow.
###
6. Instruction: Translate to French.
6. Input:
Good morning
6. Output:
Bonjour

Let me know if you would like more tasks!"""


def test_chat_prompt_keeps_the_examples_and_asks_for_the_rest_of_the_list():
    system, user = encode_chat_prompt("HEADER\n", SEEDS[:2])
    assert system == ALPACA_SYSTEM
    assert user.startswith(encode_prompt("HEADER\n", SEEDS[:2]).rsplit("###\n3. Instruction:", 1)[0])
    assert user.endswith("Continue the list with tasks 3 to 20 in exactly the same format (3. Instruction: ..., "
                         "3. Input: ..., 3. Output: ...), separated by ###.")
    chat, _ = build_prompts(SEEDS, "H", 2, 3, 42, "chat")
    completion, _ = build_prompts(SEEDS, "H", 2, 3, 42, "completion")
    assert all(isinstance(p, tuple) for p in chat) and all(isinstance(p, str) for p in completion)


def test_chat_reply_preamble_markdown_and_commentary():
    items = parse_chat_response(CHAT_REPLY, 4, "stop")
    assert [(i["instruction"], i["input"], i["output"]) for i in items] == [
        ("Classify the animal as mammal or bird.", "sparrow", "bird"),
        ("Name three primary colours.", "", "Red, blue and yellow."),
        ("Translate to French.", "Good morning", "Bonjour")]
    # the completion parser keeps the preamble and the commentary as junk: the chat parser is needed
    assert "Let me know" in "".join(str(i["output"]) for i in parse_response(CHAT_REPLY, 4, "stop"))


def test_chat_reply_restarted_numbering_unnumbered_labels_and_no_items():
    restarted = "1. Instruction: Add the numbers.\n1. Input: 2 and 3\n1. Output: 5\n\n2. Instruction: Name a fruit.\n" \
                "2. Input: <noinput>\n2. Output: Apple"
    assert [(i["instruction"], i["output"]) for i in parse_chat_response(restarted, 4, "stop")] == \
        [("Add the numbers.", "5"), ("Name a fruit.", "Apple")]
    unnumbered = "Instruction: Add the numbers.\nInput: 2 and 3\nOutput: 5\n###\nInstruction 5: Name a fruit.\n" \
                 "Input: None\nOutput: Apple"
    items = parse_chat_response(unnumbered, 4, "stop")
    assert [(i["instruction"], i["input"], i["output"], i["reason"]) for i in items] == \
        [("Add the numbers.", "2 and 3", "5", None), ("Name a fruit.", "", "Apple", None)]
    headed = "### Task 4\nInstruction: Add the numbers.\nInput: 2 and 3\nOutput: 5\n###\n### Task 5\n" \
             "Instruction: Name a fruit.\nInput: <noinput>\nOutput: Apple\n###"
    assert [(i["instruction"], i["output"]) for i in parse_chat_response(headed, 4, "stop")] == \
        [("Add the numbers.", "5"), ("Name a fruit.", "Apple")]
    assert parse_chat_response("I'm sorry, I can't help with that.", 4, "stop")[0]["reason"] == "no_items"
    cut = parse_chat_response(restarted, 4, "length")
    assert [i["reason"] for i in cut] == [None, "truncated"]


def test_rows_from_chat_records_use_the_chat_parser():
    recs = [{"prompt": ["sys", "user"], "text": CHAT_REPLY, "finish_reason": "stop", "key": "k", "response_id": "r",
             "teacher": "gpt-4o-mini", "sampling": {}, "served_model": "gpt-4o-mini-2024-07-18",
             "system_fingerprint": "fp_1"}]
    tasks, unparsed = rows_from_records(recs, [["s1"]], 4, "chat")
    assert len(tasks) == 3 and not unparsed
    assert {t["served_model"] for t in tasks} == {"gpt-4o-mini-2024-07-18"} and tasks[0]["system_fingerprint"] == "fp_1"


def test_documented_examples():
    """docs/real-teachers.md: every example block is valid params and builds the request it describes."""
    import re
    from dataclasses import asdict

    import yaml

    from stages.evaluate import EvaluateParams
    from stages.lib.llm.openai_wire import request_body
    from tests.support.tiny import ROOT

    blocks = dict(re.findall(r"```yaml\n# example: (\S+)\n(.*?)```",
                             (ROOT / "docs/real-teachers.md").read_text(), re.S))
    assert set(blocks) == {"openai-chat", "openai-reasoning", "vllm", "ollama", "evaluate"}
    bodies = {}
    for name, text in blocks.items():
        values = yaml.safe_load(text)
        if name == "evaluate":
            e = EvaluateParams(**values)
            assert e.teacher.system_prompt == "Answer concisely." and e.judge.backend == "openai"
            continue
        p = GenerateParams(**{**{k: v for k, v in asdict(GenerateParams()).items()}, **values})
        t = p.teacher
        assert t.prompt_form == "chat" and t.backend == "openai"
        bodies[name] = request_body(t.model, t.prompt_form, "hi", p.max_new_tokens, p.temperature, p.top_p, (), 0,
                                    t.options())[1]
    assert bodies["openai-reasoning"]["max_completion_tokens"] == 192 + 2048
    assert bodies["openai-reasoning"]["reasoning_effort"] == "low" and "temperature" not in bodies["openai-reasoning"]
    assert bodies["openai-chat"]["max_tokens"] == 1024 and bodies["vllm"]["top_k"] == 20
    assert bodies["ollama"]["model"] == "llama3.1:8b"
