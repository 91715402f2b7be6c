"""Seed validation: good seeds load, each kind of bad input names file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.lib.errors import StageError
from stages.lib.stats import Stats
from stages.lib.text.novelty import rouge_tokens
from stages.seeds import load_seeds
from tests.support.helpers import rouge_l_f1
from tests.support.tiny import ROOT, shared

GOOD = {"id": "t1", "name": "n1", "instruction": "Say hi to the user.", "instances": [{"input": "", "output": "Hi!"}],
        "is_classification": False}


def write(tmp_path: Path, lines: list, name: str = "s.jsonl") -> Path:
    p = tmp_path / name
    p.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines) + b"\n")
    return p


def error_of(path: Path) -> str:
    with pytest.raises(StageError) as e:
        load_seeds([path])
    return str(e.value)


def test_good_seeds_load(tmp_path):
    df = load_seeds([write(tmp_path, [GOOD, {**GOOD, "id": "t2", "is_classification": True}])])
    assert df["id"].to_list() == ["t1", "t2"]
    assert df["instances"][0].to_list() == [{"input": "", "output": "Hi!"}]
    assert df["is_classification"].to_list() == [False, True]


def test_invalid_json_names_file_and_line(tmp_path):
    p = write(tmp_path, [GOOD, b'{"id": "t2", "name": '])
    assert f"{p}:2: line: invalid JSON" in error_of(p)


@pytest.mark.parametrize("field", ["id", "name", "instruction", "instances", "is_classification"])
def test_missing_field(tmp_path, field):
    rec = {k: v for k, v in GOOD.items() if k != field}
    p = write(tmp_path, [rec])
    assert f"{p}:1: {field}: missing" in error_of(p)


@pytest.mark.parametrize("field", ["id", "name", "instruction"])
def test_empty_field(tmp_path, field):
    p = write(tmp_path, [GOOD, {**GOOD, "id": "t2", field: "  "}])
    assert f"{p}:2: {field}: empty" in error_of(p)


def test_empty_output_and_instances(tmp_path):
    p = write(tmp_path, [{**GOOD, "instances": [{"input": "x", "output": ""}]}, {**GOOD, "id": "t2", "instances": []}])
    msg = error_of(p)
    assert f"{p}:1: instances[0].output: empty" in msg
    assert f"{p}:2: instances: expected a non-empty list" in msg


def test_wrong_types(tmp_path):
    p = write(tmp_path, [{**GOOD, "is_classification": "yes", "instances": [{"input": 3, "output": "x"}]}])
    msg = error_of(p)
    assert "is_classification: expected true or false" in msg
    assert "instances[0].input: expected a string" in msg


def test_duplicate_id_across_files(tmp_path):
    a = write(tmp_path, [GOOD], "a.jsonl")
    b = write(tmp_path, [{**GOOD, "name": "other"}], "b.jsonl")
    with pytest.raises(StageError) as e:
        load_seeds([a, b])
    assert f"{b}:1: id: duplicate 't1' (first at {a}:1)" in str(e.value)


def test_text_from_the_wild_is_repaired_and_an_oversized_task_dropped(tmp_path):
    lines = [
        json.dumps({**GOOD, "id": "bytes"}).encode().replace(b"hi", b"h\xff"),       # invalid UTF-8 in a JSONL line
        json.dumps({**GOOD, "id": "surrogate", "instruction": "Say \ud800 hi."}).encode(),  # lone surrogate
        json.dumps({**GOOD, "id": "nul", "instruction": "Say\u0000 hi."}).encode(),   # NUL
        json.dumps({**GOOD, "id": "huge", "instruction": "word " * 1_000_000}).encode(),  # a 5 MB message
        json.dumps({**GOOD, "id": "fine"}).encode(),
    ]
    counts = Stats()
    df = load_seeds([write(tmp_path, lines)], counts)
    assert df["id"].to_list() == ["bytes", "surrogate", "nul", "fine"]
    assert df["instruction"].to_list()[:3] == ["Say h\ufffd to the user.", "Say \ufffd hi.", "Say hi."]
    assert counts == {"repaired": 3, "too_long": 1}
    df.write_parquet(tmp_path / "out.parquet")  # encodable: nothing left that UTF-8 refuses


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_bytes(b"\n")
    assert f"{p}: empty file" in error_of(p)


def test_missing_file(tmp_path):
    assert "cannot read" in error_of(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- the project's own seed set

PROJECT_SEEDS = ROOT / "seeds" / "seed_tasks.jsonl"


def test_project_seed_set_is_valid_and_diverse():
    df = load_seeds([PROJECT_SEEDS])
    assert df.height >= 175
    assert int(df["is_classification"].sum()) >= 25
    assert all(len(x) >= 1 for x in df["instances"].to_list())
    first_words = [s.split()[0].lower() for s in df["instruction"].to_list()]
    assert max(first_words.count(w) for w in set(first_words)) / df.height < 0.15, "too many instructions share a verb"


def test_project_seeds_are_not_copies_of_self_instruct_seeds():
    lines = shared("self-instruct", "seed_tasks.jsonl").read_text().splitlines()
    ref = [json.loads(line)["instruction"] for line in lines]
    ref_tokens = [rouge_tokens(r) for r in ref]
    worst = 0.0
    for inst in load_seeds([PROJECT_SEEDS])["instruction"].to_list():
        toks = rouge_tokens(inst)
        worst = max(worst, max(rouge_l_f1(toks, r) for r in ref_tokens))
    assert worst <= 0.7
