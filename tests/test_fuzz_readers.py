"""Property-based fuzz of every file reader (hypothesis): seeds, each corpus format, prompt files, eval sets and
params. Every generated input ends in records kept or dropped with a reason, or in one StageError line naming
the file; never another exception. Small `max_examples` keep the whole file within about a minute."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.lib.errors import StageError
from stages.lib.formats import Malformed, read_prompts, records, to_messages
from stages.lib.params import load_params
from stages.seeds import parse_seed_file

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = ["id", "name", "instruction", "input", "output", "instances", "is_classification", "conversations", "from",
        "value", "items", "messages", "role", "content", "question", "human_answers", "turns", "prompt", "text",
        "response", "question_id"]
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20) | \
    st.sampled_from(["human", "gpt", "user", "assistant", "system", "", "Copy code", "```py Copy code"])
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(
    max_size=5), c, max_size=5), max_leaves=12)
RECORD = st.dictionaries(st.sampled_from(KEYS), JSON, max_size=6)
LINE = st.one_of(RECORD.map(json.dumps), JSON.map(json.dumps), st.binary(max_size=40), st.text(max_size=40).map(
    str.encode), st.sampled_from([b"[" * 5000, b"{" * 3000, b'{"a": "\xe2\x80\xa8"}', b"\xff\xfe", b"\x00"]))
LINES = st.lists(LINE.map(lambda x: x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass")),
                 max_size=6).map(b"\n".join)
FORMATS = ["sharegpt", "alpaca", "generated", "hc3", "messages"]


def written(data: bytes, suffix: str) -> Path:
    """`data` in a fresh file (hypothesis runs many examples per test, so no function-scoped tmp_path)."""
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    path = folder / f"input{suffix}"
    path.write_bytes(data)
    return path


def one_line_naming(e: StageError, path: Path) -> None:
    msg = str(e)
    assert "\n" not in msg and str(path) in msg, msg


@FUZZ
@given(LINES)
def test_seed_files(data):
    path = written(data, ".jsonl")
    recs, errors = parse_seed_file(path, data, {})
    assert all(e.startswith(f"{path}") and "\n" not in e for e in errors), errors
    assert all(isinstance(r, dict) for r in recs)


@FUZZ
@given(LINES, st.sampled_from([".jsonl", ".json"]), st.sampled_from(FORMATS))
def test_corpus_formats(data, suffix, fmt):
    path = written(data, suffix)
    try:
        for _, rec in records(path, stats={"repaired": 0, "too_long": 0}):
            try:
                convs = to_messages(rec, fmt, answers="human")
            except Malformed as m:
                assert str(m) and m.reason in ("malformed", "too_long")
                continue
            assert all(isinstance(msgs, list) for _, msgs in convs)
    except StageError as e:
        one_line_naming(e, path)


@FUZZ
@given(LINES, st.sampled_from([".jsonl", ".json"]))
def test_prompt_files(data, suffix):
    path = written(data, suffix)
    try:
        prompts = read_prompts(path, stats={"repaired": 0, "too_long": 0})
    except StageError as e:
        one_line_naming(e, path)
        return
    assert all(isinstance(p["instruction"], str) for p in prompts)


@FUZZ
@given(LINES, st.sampled_from([".jsonl", ".json"]), st.sampled_from(["teacher", "response", "output"]))
def test_eval_sets(data, suffix, reference):
    from stages.evaluate import EvalSetParams, read_eval_set
    path = written(data, suffix)
    try:
        rows = read_eval_set("fuzz", EvalSetParams(str(path), reference=reference))
    except StageError as e:
        one_line_naming(e, path)
        return
    assert rows and all(isinstance(r["instruction"], str) for r in rows)


@dataclass
class FuzzParams:
    n: int = 1
    rate: float = 0.5
    name: str = "x"
    flag: bool = False


PARAMS_TEXT = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=60).map(str.encode),
    st.dictionaries(st.sampled_from(["p", "q"]), st.dictionaries(st.sampled_from(["n", "rate", "name", "flag", "zz"]),
                                                                 JSON, max_size=4) | JSON, max_size=2).map(
        lambda d: yaml.safe_dump(d).encode()),
    st.sampled_from([b"p:\n  n: 1\n  n: 2\n", b"p: [1\n", b"!!python/object:os.system {}\n", b"p: &a [*a]\n"]))


@FUZZ
@given(PARAMS_TEXT)
def test_params_files(data):
    path = written(data, ".yaml")
    try:
        p = load_params(FuzzParams, "p", path)
    except StageError as e:
        one_line_naming(e, path)
        return
    assert isinstance(p.n, int) and isinstance(p.rate, float) and isinstance(p.name, str)


@pytest.mark.parametrize("data", [b"[" * 100_000, b'{"conversations": [' * 2000])
def test_the_known_crashers_are_one_line(data):
    for suffix in (".jsonl", ".json"):
        test_corpus_formats.hypothesis.inner_test(data, suffix, "sharegpt")
        test_prompt_files.hypothesis.inner_test(data, suffix)
    test_seed_files.hypothesis.inner_test(data)


# ---------------------------------------------------------------- Batch API output lines

KEYS_OF_JOB = ["k0", "k1", "k2"]
BODY = st.fixed_dictionaries({}, optional={
    "choices": st.one_of(JSON, st.lists(st.fixed_dictionaries({}, optional={
        "message": st.one_of(JSON, st.fixed_dictionaries({}, optional={"content": JSON, "role": JSON})),
        "text": JSON, "finish_reason": JSON}), max_size=2)),
    "usage": st.one_of(JSON, st.fixed_dictionaries({}, optional={
        "prompt_tokens": JSON, "completion_tokens": JSON, "completion_tokens_details": JSON})),
    "id": JSON, "model": JSON, "error": JSON})
RESULT = st.fixed_dictionaries({}, optional={
    "custom_id": st.sampled_from(KEYS_OF_JOB) | JSON,
    "response": st.one_of(JSON, st.fixed_dictionaries({}, optional={"status_code": JSON | st.sampled_from([200, 429]),
                                                                    "body": BODY | JSON})),
    "error": st.one_of(JSON, st.fixed_dictionaries({}, optional={"code": JSON, "message": JSON}))})
BATCH_LINE = st.one_of(RESULT.map(json.dumps), JSON.map(json.dumps), st.text(max_size=30),
                       st.sampled_from(['{"custom_id": "k0", "response": {"status_code": 200, "body": '
                                        '{"choices": [{"message": {"content": "a\u2028b"}}]}}}', "[" * 3000]))
BATCH_FILE = st.lists(BATCH_LINE, max_size=6).map("\n".join)


@FUZZ
@given(BATCH_FILE, BATCH_FILE, st.sampled_from(["chat", "completion"]))
def test_batch_output_lines(output, errors, form):
    """A finished job's output and error files, whatever their lines hold: each of the job's requests ends
    answered (a Completion with text) or failed with a reason, and the job is marked collected; never an
    exception (the real files are JSONL of `{custom_id, response: {status_code, body}, error}`:
    https://platform.openai.com/docs/guides/batch)."""
    from types import SimpleNamespace

    from stages.lib.llm.backend import RunReport
    from stages.lib.llm.openai_batch import BatchBackend
    from stages.lib.llm.types import Completion, Request

    files = {"out": output, "err": errors}
    client = SimpleNamespace(
        batches=SimpleNamespace(retrieve=lambda bid: SimpleNamespace(
            id=bid, status="completed", output_file_id="out", error_file_id="err", request_counts=None)),
        files=SimpleNamespace(content=lambda fid: SimpleNamespace(text=files[fid])))
    collected = []
    backend = BatchBackend.__new__(BatchBackend)
    backend.prompt_form, backend.ledger = form, SimpleNamespace(collected=collected.append)
    reqs = {k: Request(key=k, prompt="p") for k in KEYS_OF_JOB}
    outcomes = {}

    def on_done(req, comp, error):
        assert req.key not in outcomes, f"{req.key} answered twice"
        outcomes[req.key] = (comp, error)

    ok = backend._collect(client, "batch_1", set(reqs), reqs, on_done, RunReport())
    assert collected == ["batch_1"] and set(outcomes) == set(reqs)
    for key, (comp, error) in outcomes.items():
        if key in ok:
            assert isinstance(comp, Completion) and isinstance(comp.text, str) and error is None
        else:
            assert comp is None and isinstance(error, str) and error.startswith("batch:") and "\n" not in error
