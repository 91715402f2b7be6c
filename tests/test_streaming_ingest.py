"""`ingest` streams its corpus: JSON Lines line by line, a JSON array item by item in 1 MiB chunks, and rows go
to parquet shards as they fill (`ShardWriter`). The parser must give exactly what `json.loads` gives, whatever
the chunk boundaries cut (a multi-byte character, a number, a string), and the same `file:line` on bad JSON.
Memory against corpus size is measured in `benchmarks/ingest_memory.py`, not here."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages import ingest
from stages.ingest import DROPPED_SCHEMA, SCHEMA, IngestParams, SourceParams, build
from stages.lib import formats
from stages.lib.errors import StageError
from stages.lib.formats import Malformed, records
from stages.lib.io import ShardWriter, write_shards
from stages.lib.text.clean import clean_json

STATS = {"repaired": 0, "too_long": 0}
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | TEXT |
                      st.floats(allow_nan=False, allow_infinity=False),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                      max_leaves=12)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def read(path: Path) -> list:
    return [rec for _, rec in records(path, stats=dict(STATS))]


@SETTINGS
@given(items=st.lists(VALUES, max_size=8), chunk=st.integers(1, 64), indent=st.sampled_from([None, 0, 2]),
       ascii_only=st.booleans())
def test_a_json_array_read_in_chunks_is_what_json_loads_reads(tmp_path, monkeypatch, items, chunk, indent,
                                                              ascii_only):
    monkeypatch.setattr(formats, "CHUNK_BYTES", chunk)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(items, indent=indent, ensure_ascii=ascii_only), encoding="utf-8")
    assert read(path) == [clean_json(x) for x in json.loads(path.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("text", [
    '[{"a": 1},\n {"b": 2}\n {"c": 3}]',  # a missing comma on line 3
    '[{"a": 1},\n\n {"b": "open\n',  # a raw newline inside a string
    '[{"a": 1}, {"b": tru}]',
    '[1, 2]\n\nx',  # extra data after the array
    '[{"a": 1},\n{"b": [1, 2,]}]',
    '[\n{"a": 12',  # cut off
    '',
])
@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
def test_bad_json_stops_with_the_line_json_loads_names(tmp_path, monkeypatch, text, chunk):
    monkeypatch.setattr(formats, "CHUNK_BYTES", chunk)
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(text)
    with pytest.raises(StageError) as got:
        read(path)
    assert str(got.value).startswith(f"{path}:{want.value.lineno}: invalid JSON: "), (str(got.value), want.value)


def test_a_json_document_that_is_not_an_array_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"conversations": []}')
    with pytest.raises(StageError, match="expected a JSON array of records"):
        read(path)


def test_invalid_utf8_split_by_a_chunk_boundary_is_repaired_once(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "CHUNK_BYTES", 3)
    path = tmp_path / "c.json"
    path.write_bytes(b'\xef\xbb\xbf["caf\xc3\xa9", "b\xffd", "\xe2\x82\xac"]')  # BOM, a good 2-byte char, a bad byte
    stats = dict(STATS)
    assert [r for _, r in records(path, stats=stats)] == ["café", "b\ufffdd", "€"]
    assert stats["repaired"] == 1


def test_a_record_nested_too_deep_in_an_array_is_dropped_and_the_rest_kept(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('[{"a": 1}, ' + "[" * 150 + "]" * 150 + ', {"b": 2}]')
    out = read(path)
    assert out[0] == {"a": 1} and out[2] == {"b": 2} and isinstance(out[1], Malformed)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_the_first_record_comes_before_the_file_is_read(tmp_path, suffix):
    """Streaming, checked on the file offset: a reader that loads the whole file first fails this."""
    rec = {"conversations": [{"from": "human", "value": "x" * 1000}]}
    path = tmp_path / f"c{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps([rec] * 5000))
    else:
        path.write_text("\n".join(json.dumps(rec) for _ in range(5000)))
    opened = []
    real_open = Path.open

    def spy(self, *a, **k):
        f = real_open(self, *a, **k)
        opened.append(f)
        return f

    with mock.patch.object(Path, "open", spy):
        gen = records(path, stats=dict(STATS))
        next(gen)
        assert opened[0].tell() <= formats.CHUNK_BYTES < path.stat().st_size / 4
        gen.close()


@pytest.mark.parametrize("n", [0, 1, 3, 7])
def test_shard_writer_writes_the_files_write_shards_writes(tmp_path, n):
    rows = [{"id": f"s:{i}", "source": "s", "original_id": str(i), "licence": "x", "origin": f"f:{i}",
             "messages": [{"role": "user", "content": "é" * i}], "copy": 0} for i in range(n)]
    a, b = tmp_path / "a", tmp_path / "b"
    want = write_shards(pl.DataFrame(rows, schema=SCHEMA), a, "conversations", 3)
    w = ShardWriter(b, "conversations", SCHEMA, 3)
    for r in rows:
        w.append(r)
    got = w.close()
    assert [p.name for p in got] == [p.name for p in want]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(want, got, strict=True))


def test_build_into_shards_is_build_into_lists_and_an_empty_source_is_warned(tmp_path, capsys):
    sg = tmp_path / "sg.jsonl"
    sg.write_text("\n".join(json.dumps({"id": str(i), "conversations": [
        {"from": "human", "value": f"Question number {i} about the weather in a city, please answer it."},
        {"from": "gpt", "value": f"Answer {i}: it is sunny and warm today in that city, with light wind."}]})
        for i in range(9)) + "\nnot json\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    p = IngestParams(sources={"sg": SourceParams(format="sharegpt", path=str(sg), cap=5),
                              "none": SourceParams(format="sharegpt", path=str(empty))},
                     mixtures={"m": {"sg": 1.0, "none": 1.0}}, mixture="m", languages=[], minhash_threshold=0)
    rows, dropped, m = build(p, None, {})
    assert "source 'none'" in capsys.readouterr().err and m["sources"]["none"]["read"] == 0
    conv, drop = ShardWriter(tmp_path / "o", "conversations", SCHEMA, 2), \
        ShardWriter(tmp_path / "o", "dropped", DROPPED_SCHEMA, 2)
    _, _, m2 = build(p, None, {}, conv, drop)
    conv.close(), drop.close()
    assert m2 == m and m["conversations"] == 5 and m["dropped_by_reason"] == {"malformed": 1, "over_cap": 4}
    assert ingest.read_shards(tmp_path / "o", "conversations").to_dicts() == \
        pl.DataFrame(rows, schema=SCHEMA).to_dicts()
    assert ingest.read_shards(tmp_path / "o", "dropped").height == len(dropped) == 5
