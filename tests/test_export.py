"""stages.tools.export: Alpaca JSON, ShareGPT JSON and a `datasets` directory, each read back and compared."""

from __future__ import annotations

import json

import polars as pl
import pytest

from stages.lib.errors import StageError
from stages.lib.formats import to_messages
from stages.lib.io import write_shards
from stages.tools.export import ExportArgs, export, main

KEPT = [
    {"id": "t0", "instruction": "Name a fruit.", "input": "", "output": "Apple.", "rouge_max": 0.1},
    {"id": "t1", "instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour.",
     "rouge_max": 0.2},
    {"id": "t2", "instruction": "Écris un haïku.", "input": None, "output": "Vieil étang —\nune grenouille plonge",
     "rouge_max": 0.0},
]
CONVS = [
    {"id": "c0", "source": "sharegpt", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]},
    {"id": "c1", "source": "generated", "messages": [
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
]


def test_alpaca_round_trip(tmp_path):
    out = tmp_path / "alpaca.json"
    assert export(ExportArgs("alpaca", str(out)), KEPT) == 3
    back = json.loads(out.read_text(encoding="utf-8"))
    assert back == [{"instruction": r["instruction"], "input": r["input"] or "", "output": r["output"]} for r in KEPT]
    # what our own ingest makes of the export is what it makes of the kept rows
    assert [to_messages(r, "alpaca")[0][1] for r in back] == [to_messages(r, "generated")[0][1] for r in KEPT]


def test_sharegpt_round_trip_from_tasks(tmp_path):
    out = tmp_path / "sharegpt.json"
    export(ExportArgs("sharegpt", str(out)), KEPT)
    back = json.loads(out.read_text(encoding="utf-8"))
    assert [r["id"] for r in back] == ["t0", "t1", "t2"]
    assert back[1]["conversations"] == [{"from": "human", "value": "Translate to French.\n\nGood morning"},
                                        {"from": "gpt", "value": "Bonjour."}]
    assert [to_messages(r, "sharegpt")[0][1] for r in back] == [to_messages(r, "generated")[0][1] for r in KEPT]


def test_sharegpt_round_trip_from_conversations(tmp_path):
    out = tmp_path / "mix.json"
    export(ExportArgs("sharegpt", str(out), source="conversations"), CONVS)
    back = json.loads(out.read_text(encoding="utf-8"))
    assert [r["conversations"][0]["from"] for r in back] == ["system", "human"]
    assert [(oid, msgs) for r in back for oid, msgs in to_messages(r, "sharegpt")] == \
        [(c["id"], c["messages"]) for c in CONVS]


def test_hf_round_trip(tmp_path):
    import datasets  # the `export` extra, part of the test extras
    out = tmp_path / "hf"
    export(ExportArgs("hf", str(out)), KEPT)
    ds = datasets.load_from_disk(str(out))
    assert ds.column_names == ["id", "instruction", "input", "output"]
    assert ds.to_list() == [{"id": r["id"], "instruction": r["instruction"], "input": r["input"] or "",
                             "output": r["output"]} for r in KEPT]
    export(ExportArgs("hf", str(out), source="conversations", force=True), CONVS)  # replaces the folder whole
    ds = datasets.load_from_disk(str(out))
    assert ds.to_list() == CONVS


def test_an_existing_non_empty_out_is_refused_without_force(tmp_path):
    other = tmp_path / "datasets"
    (other / "my-other-project").mkdir(parents=True)
    (other / "my-other-project" / "data.jsonl").write_text("{}\n")
    with pytest.raises(StageError, match="exists and is not empty; pass --force"):
        main(["--format", "hf", "--in", str(tmp_path / "filtered"), "--out", str(other)])
    assert (other / "my-other-project" / "data.jsonl").read_text() == "{}\n"
    (tmp_path / "a.json").write_text("[]\n")
    with pytest.raises(ValueError, match="pass --force"):
        ExportArgs("alpaca", str(tmp_path / "a.json"))
    (tmp_path / "empty").mkdir()
    ExportArgs("hf", str(tmp_path / "empty"))  # an empty folder holds nothing to lose
    assert ExportArgs("alpaca", str(tmp_path / "a.json"), force=True).force


def test_alpaca_refuses_multi_turn_conversations_naming_them(tmp_path):
    out = tmp_path / "a.json"
    with pytest.raises(StageError, match="conversation c0: roles"):
        export(ExportArgs("alpaca", str(out), source="conversations"), CONVS)
    assert not out.exists()
    export(ExportArgs("alpaca", str(out), source="conversations"), CONVS[1:])
    assert json.loads(out.read_text()) == [{"instruction": "Name a colour.", "input": "", "output": "Blue."}]


def test_bad_rows_and_args_are_named():
    with pytest.raises(StageError, match="task t9: output: expected a string"):
        export(ExportArgs("alpaca", "x.json"), [{"id": "t9", "instruction": "Do it.", "output": None}])
    with pytest.raises(ValueError, match="--format"):
        ExportArgs("csv", "x.csv")
    with pytest.raises(ValueError, match="--from"):
        ExportArgs("hf", "x", source="generated")


def test_main_reads_the_kept_shards(tmp_path):
    write_shards(pl.DataFrame(KEPT), tmp_path / "filtered", "kept")
    write_shards(pl.DataFrame(KEPT[:1]), tmp_path / "filtered", "rejected")  # never exported
    out = tmp_path / "out.json"
    main(["--format", "alpaca", "--in", str(tmp_path / "filtered"), "--out", str(out)])
    assert [r["instruction"] for r in json.loads(out.read_text())] == [r["instruction"] for r in KEPT]
