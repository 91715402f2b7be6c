"""ingest: every source format, malformed records, each cleaning step, mixtures, decontamination."""

from __future__ import annotations

import json

import pytest

from stages.ingest import (
    Decontaminator,
    IngestParams,
    SourceParams,
    build,
    clean_text,
    fix_roles,
    keep_share,
    language_reason,
    names_teacher,
    read_source,
)
from stages.lib.errors import StageError
from tests.support.tiny import shared

U, A, S = "user", "assistant", "system"


def msg(role, content):
    return {"role": role, "content": content}


def params(**kw):
    base = {"sources": {}, "mixtures": {"m": {}}, "mixture": "m", "minhash_threshold": 0.9}
    base.update(kw)
    return IngestParams(**base)


HC3 = [
    {"id": 7, "question": "Why is the sky blue during the day?",
     "human_answers": ["Because of Rayleigh scattering of sunlight by the air."],
     "chatgpt_answers": ["The sky looks blue because air molecules scatter short blue wavelengths more than red.",
                         "Sunlight is scattered by the atmosphere, and blue light is scattered the most."]},
    {"id": 8, "question": "What is a mortgage?", "human_answers": "not a list", "chatgpt_answers": []},
]


def write_jsonl(path, recs, extra=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + extra)
    return path


# ---------------------------------------------------------------- reading


def test_real_sharegpt_conversations():
    path = str(shared("sharegpt", "dialogstudio_original_example.json"))
    convs, bad = read_source("sharegpt", SourceParams(**{"format": "sharegpt", "path": path,
                                                         "licence": "sharegpt-terms"}))
    assert len(convs) == 5 and not bad
    assert convs[0]["id"] == "sharegpt:QWJhYvA_0" and convs[0]["licence"] == "sharegpt-terms"
    assert convs[0]["origin"].endswith("dialogstudio_original_example.json[0]")
    assert [m["role"] for m in convs[0]["messages"]][:4] == [U, A, U, A]


def test_real_alpaca_slice():
    path = str(shared("alpaca", "alpaca_data_first1727_flashmodels.json"))
    convs, bad = read_source("alpaca", SourceParams(**{"format": "alpaca", "path": path}))
    assert len(convs) == 1727 and not bad
    with_input = next(c for c in convs if "\n\n" in c["messages"][0]["content"])
    assert with_input["messages"][1]["role"] == A


def test_hc3_both_answer_kinds_and_malformed(tmp_path):
    path = write_jsonl(tmp_path / "hc3.jsonl", HC3, extra="{not json\n")
    gpt, bad = read_source("hc3_chatgpt", SourceParams(**{"format": "hc3", "path": str(path), "answers": "chatgpt"}))
    assert [c["original_id"] for c in gpt] == ["7-0", "7-1"]  # record 8 has no ChatGPT answers: nothing to add
    assert [b["origin"] for b in bad] == [f"{path}:3"] and "invalid JSON" in bad[0]["reason"]
    human, bad = read_source("hc3_human", SourceParams(**{"format": "hc3", "path": str(path), "answers": "human"}))
    assert len(human) == 1 and human[0]["messages"][1]["content"].startswith("Because of Rayleigh")
    assert [(b["origin"], b["reason"]) for b in bad] == [(f"{path}:2", "human_answers: expected a list of strings"),
                                                         (f"{path}:3", bad[1]["reason"])]


def test_malformed_records_are_reported_and_the_rest_kept(tmp_path):
    recs = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
            {"messages": [{"role": "robot", "content": "x"}]},
            {"messages": "nope"},
            {"messages": [{"role": "user", "content": 3}]}]
    path = write_jsonl(tmp_path / "m.jsonl", recs)
    convs, bad = read_source("oai", SourceParams(**{"format": "messages", "path": str(path)}))
    assert len(convs) == 1
    assert [(b["origin"].rsplit(":", 1)[1], b["reason"]) for b in bad] == [
        ("2", "messages[0].role: expected system, user or assistant"), ("3", "messages: expected a list"),
        ("4", "messages[0].content: expected a string")]
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"id": "a", "conversations": [{"from": "alien", "value": "x"}]},
                                {"id": "b",
                                 "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}]))
    convs, bad = read_source("sg", SourceParams(**{"format": "sharegpt", "path": str(path)}))
    assert [c["id"] for c in convs] == ["sg:b"] and bad[0]["origin"].endswith("s.json[0]")
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Add.", "input": "", "output": "3"}, {"instruction": 5, "output": "x"},
                                {"instruction": "Go.", "input": ["x"], "output": "ok"}, "text"]))
    convs, bad = read_source("alp", SourceParams(**{"format": "alpaca", "path": str(path)}))
    assert len(convs) == 1 and [b["reason"] for b in bad] == ["instruction: expected a string",
                                                              "input: expected a string",
                                                            "expected an object"]
    with pytest.raises(StageError, match="not found"):
        read_source("x", SourceParams(**{"format": "alpaca", "path": str(tmp_path / "missing.json")}))


# ---------------------------------------------------------------- cleaning steps


def test_clean_text_html_and_artefacts():
    html = "<p>Use <strong>this</strong>:</p><ol><li>one</li><li>two</li></ol>"
    assert clean_text(html) == "Use **this**:\n\n1. one\n2. two"
    assert clean_text("2 / 2\nSure, here it is.") == "Sure, here it is."
    assert clean_text("```pythonCopy code\nprint(1)\n```") == "```python\nprint(1)\n```"
    assert clean_text("Text Copy12 chars / 3 words\n\n\n\nmore") == "Text \n\nmore"
    assert clean_text("plain a < b and c > d") == "plain a < b and c > d"


def test_fix_roles():
    assert fix_roles([msg(A, "hi"), msg(U, "q"), msg(A, "a"), msg(U, "dangling")]) == \
        ([msg(U, "q"), msg(A, "a")], None, True)
    assert fix_roles([msg(S, "be nice"), msg(U, "q"), msg(U, "more"), msg(A, "a")]) == \
        ([msg(S, "be nice"), msg(U, "q\n\nmore"), msg(A, "a")], None, True)
    assert fix_roles([msg(U, "q"), msg(A, "a"), msg(U, ""), msg(A, "lost")]) == ([msg(U, "q"), msg(A, "a")], None, True)
    assert fix_roles([msg(U, "q")])[1] == "no_assistant_turn"
    assert fix_roles([msg(U, "q"), msg(A, "a")]) == ([msg(U, "q"), msg(A, "a")], None, False)


def test_names_teacher():
    names = ["openai", "chatgpt", "open ai"]
    assert names_teacher([msg(U, "q"), msg(A, "As a model trained by OpenAI, I...")], names) == "openai"
    assert names_teacher([msg(A, "Open AI says")], names) == "open ai"
    assert names_teacher([msg(A, "reopenai_x and chatgpts")], names) is None


def test_language_id_per_message():
    en = "The quick brown fox jumps over the lazy dog near the river bank."
    fr = "Le renard brun rapide saute par-dessus le chien paresseux près de la rivière."
    assert language_reason([msg(U, en), msg(A, en)], ["en"], 20) is None
    assert language_reason([msg(U, en), msg(A, fr)], ["en"], 20) == "language:fr"
    assert language_reason([msg(U, "Ok"), msg(A, en)], ["en"], 20) is None  # too short to identify
    assert language_reason([msg(U, fr)], [], 20) is None


def test_decontamination_against_real_eval_sets():
    koala = [json.loads(x)["prompt"] for x in shared("koala", "koala_test_set.jsonl").read_text().splitlines()]
    vicuna_lines = shared("fastchat", "vicuna_eval_2023-03", "question.jsonl").read_text().splitlines()
    selfi_lines = shared("self-instruct", "user_oriented_instructions.jsonl").read_text().splitlines()
    vicuna = [json.loads(x)["text"] for x in vicuna_lines]
    selfi = [json.loads(x)["instruction"] for x in selfi_lines]
    d = Decontaminator({"koala": koala, "vicuna": vicuna, "self-instruct-252": selfi}, 8)
    assert d.check("Please answer: " + vicuna[3] + " Thanks.") == "vicuna"
    assert d.check(koala[10]) == "koala" and d.check(selfi[0]) == "self-instruct-252"
    assert d.check("Write a haiku about a teapot and a lonely lighthouse keeper.") is None
    short = Decontaminator({"s": ["Tell me a joke"]}, 8)
    assert short.check("ok, tell me a joke!") == "s" and short.check("tell me a jokebook") is None


def test_keep_share_is_seeded_and_proportional():
    ids = [f"c{i}" for i in range(4000)]
    assert sum(keep_share(i, 0.25, 0) for i in ids) == pytest.approx(1000, rel=0.1)
    assert [keep_share(i, 0.25, 0) for i in ids] == [keep_share(i, 0.25, 0) for i in ids]
    assert [keep_share(i, 0.25, 0) for i in ids] != [keep_share(i, 0.25, 1) for i in ids]
    assert {keep_share(i, 2.0, 0) for i in ids} == {2} and {keep_share(i, 0, 0) for i in ids} == {0}


# ---------------------------------------------------------------- the whole stage


def test_build_mixtures_with_counts(tmp_path):
    hc3 = write_jsonl(tmp_path / "hc3.jsonl", HC3)
    sg = tmp_path / "sg.json"
    long_en = "Here is a detailed answer that explains the topic step by step in plain English words."
    sg.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "Explain recursion to a child please."},
                                      {"from": "gpt", "value": "<p>" + long_en + "</p>"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Explain recursion to a child please."},
                                      {"from": "gpt", "value": long_en}]},  # same first pair after cleaning
        {"id": "c", "conversations": [{"from": "human", "value": "Who made you?"},
                                      {"from": "gpt", "value": "I was trained by OpenAI."}]},
        {"id": "d", "conversations": [{"from": "human", "value": "Tell me a joke about cats."},
                                      {"from": "gpt",
                                       "value": "Why did the cat sit on the computer? To keep an eye on the mouse."}]},
        {"id": "a", "conversations": [{"from": "human", "value": "Another question entirely, about the weather?"},
                                      {"from": "gpt", "value": long_en}]},  # repeated id
        {"id": "e", "conversations": [{"from": "human", "value": "What is the capital of Peru, please?"},
                                      {"from": "gpt", "value": "Too many requests in 1 hour. Try again later."}]},
    ]))
    generated = [{"id": "gen-1", "instruction": "List three fruits.", "input": "", "output": "Apple, pear, plum."}]
    sources = {"generated": {"format": "generated"}, "sharegpt": {"format": "sharegpt", "path": str(sg)},
               "hc3_chatgpt": {"format": "hc3", "path": str(hc3), "answers": "chatgpt"},
               "hc3_human": {"format": "hc3", "path": str(hc3), "answers": "human", "cap": 1}}
    mixtures = {"distill": {"generated": 1, "sharegpt": 1, "hc3_chatgpt": 1},
                "all": {"generated": 1, "sharegpt": 1, "hc3_chatgpt": 1, "hc3_human": 2}}
    p = params(sources=sources, mixtures=mixtures, mixture="distill", languages=["en"])
    rows, dropped, m = build(p, generated, {"koala": ["Tell me a joke about cats"]})
    assert sorted(r["id"] for r in rows) == ["generated:gen-1", "hc3_chatgpt:7-0", "hc3_chatgpt:7-1", "sharegpt:a"]
    assert {d["id"]: d["reason"] for d in dropped if d["id"]} == {
        "sharegpt:b": "duplicate", "sharegpt:c": "names_teacher", "sharegpt:d": "contaminated",
        "sharegpt:a": "duplicate_id", "sharegpt:e": "blocked"}
    assert m["sources"]["sharegpt"] == {"read": 6, "clean": 1, "in_mixture": 1, "weight": 1, "malformed": 0}
    assert m["malformed"] == 0 and m["html_or_artefacts_cleaned"] == 1
    rows, dropped, m = build(IngestParams(**{**p.__dict__, "mixture": "all"}), generated, {})
    assert m["sources"]["hc3_human"]["in_mixture"] == 2 and m["mixture"] == "all"  # weight 2: repeated
    assert sum(r["source"] == "hc3_human" for r in rows) == 2 and {r["copy"] for r in rows} == {0, 1}


def test_params_are_checked():
    with pytest.raises(Exception, match="unknown source"):
        IngestParams(mixtures={"m": {"nope": 1}}, mixture="m")
    with pytest.raises(Exception, match="answers"):
        IngestParams(sources={"h": {"format": "hc3", "path": "x"}}, mixtures={"m": {"h": 1}}, mixture="m")
    with pytest.raises(Exception, match="not in mixtures"):
        IngestParams(mixture="other")


def test_ingest_and_filter_share_one_minhash_dedup_with_the_seed_a_param(monkeypatch):
    """One MinHash implementation (stages/lib/text/dedup.py); ingest's seed is `ingest.minhash_seed`
    (default 1, the value it had hard-coded, so the default build's data is unchanged)."""
    import stages.ingest as ingest
    from stages.filter import FilterParams
    from stages.lib.text.dedup import NearDuplicates, word_shingles

    assert word_shingles("The cat  sat on\nthe mat", 3) == [b"cat sat on", b"on the mat", b"sat on the", b"the cat sat"]
    assert word_shingles("Too short", 3) == [b"too short"] and word_shingles("", 3) == [b""]
    d = NearDuplicates(0.5, 64, seed=1)
    text = "one two three four five six seven eight nine ten"
    assert d.twin("b", word_shingles(text, 2)) is None
    assert d.twin("a", word_shingles("eleven twelve thirteen", 2)) is None
    assert d.twin("c", word_shingles(text + " eleven", 2)) == "b"
    assert IngestParams().minhash_seed == 1 == FilterParams().minhash_seed
    seeds = []

    class Spy(NearDuplicates):
        def __init__(self, threshold, num_perm, seed):
            seeds.append(seed)
            super().__init__(threshold, num_perm, seed)

    monkeypatch.setattr(ingest, "NearDuplicates", Spy)
    msgs = [{"role": "user", "content": "a question here"}, {"role": "assistant", "content": "an answer"}]
    conv = {"id": "s:1", "source": "s", "origin": "x", "messages": msgs}
    ingest.clean([conv], IngestParams(languages=[], minhash_seed=7), None)
    assert seeds == [7]


# ---------------------------------------------------------------- text from the wild


def test_every_reader_repairs_wild_text_and_drops_an_oversized_record(tmp_path):
    ok = [{"from": "human", "value": "Name a red fruit, please."}, {"from": "gpt", "value": "A strawberry is red."}]
    # ShareGPT JSON: a lone surrogate as a JSON escape, a NUL, and a 5 MB message
    sg = tmp_path / "sg.json"
    sg.write_text(json.dumps([
        {"id": "sur", "conversations": [ok[0], {"from": "gpt", "value": "Broken \ud800 emoji."}]},
        {"id": "nul", "conversations": [{"from": "human", "value": "Hi\u0000 there"}, ok[1]]},
        {"id": "big", "conversations": [ok[0], {"from": "gpt", "value": "word " * 1_000_000}]},
        {"id": "ok", "conversations": ok}]))
    assert "\\ud800" in sg.read_text()  # written the way real dumps have it
    stats = {}
    convs, bad = read_source("sg", SourceParams(format="sharegpt", path=str(sg)), max_chars=100_000, stats=stats)
    assert [c["id"] for c in convs] == ["sg:sur", "sg:nul", "sg:ok"]
    assert convs[0]["messages"][1]["content"] == "Broken \ufffd emoji."
    assert convs[1]["messages"][0]["content"] == "Hi there"
    assert [(b["origin"].rsplit("[", 1)[1], b["kind"]) for b in bad] == [("2]", "too_long")]
    assert stats == {"repaired": 2, "too_long": 1}
    # JSONL: invalid UTF-8 bytes in one line, U+2028 inside another (not a line break in JSONL)
    path = tmp_path / "m.jsonl"
    good = {"messages": [{"role": "user", "content": "Say hi\u2028now."}, {"role": "assistant", "content": "Hi!"}]}
    path.write_bytes(json.dumps(good, ensure_ascii=False).encode() + b"\n" +
                     json.dumps(good).encode().replace(b"Hi!", b"H\xffi!") + b"\n")
    stats = {}
    convs, bad = read_source("oai", SourceParams(format="messages", path=str(path)), stats=stats)
    assert not bad and [c["messages"][1]["content"] for c in convs] == ["Hi!", "H\ufffdi!"]
    assert stats == {"repaired": 1, "too_long": 0}
    assert convs[0]["messages"][0]["content"] == "Say hi\u2028now."


def test_ingest_end_to_end_on_real_sharegpt_with_a_lone_surrogate(in_tmp):
    """The issue's case: one lone surrogate in real ShareGPT data stopped ingest with UnicodeEncodeError."""
    import polars as pl
    import yaml

    from stages.ingest import main

    recs = json.loads(shared("sharegpt", "dialogstudio_original_example.json").read_text())
    recs[2]["conversations"][1]["value"] += " \ud800"
    (in_tmp / "seeds").mkdir()
    (in_tmp / "seeds/sg.json").write_text(json.dumps(recs))  # ensure_ascii: the surrogate as "\ud800"
    params = {"sources": {"sg": {"format": "sharegpt", "path": "seeds/sg.json"}}, "mixtures": {"m": {"sg": 1}},
              "mixture": "m", "languages": [], "decontaminate": []}
    (in_tmp / "params.yaml").write_text(yaml.safe_dump({"ingest": params}))
    main()
    m = json.loads((in_tmp / "metrics/ingest.json").read_text())
    rows = pl.read_parquet(in_tmp / "data/conversations/conversations-00000.parquet")
    assert m["read"] == 5 and m["text_repaired"] == 1 and rows.height == m["conversations"] > 0
    assert m["malformed"] == 0 and "too_long" not in m["dropped_by_reason"]
    repaired = rows.filter(pl.col("original_id") == recs[2]["id"])["messages"][0]
    assert any(msg["content"].endswith("\ufffd") for msg in repaired)


def test_oversized_message_is_dropped_as_too_long_and_counted(tmp_path):
    sg = tmp_path / "sg.json"
    long_en = "Here is a detailed answer that explains the topic step by step in plain English words."
    sg.write_text(json.dumps([
        {"id": "big", "conversations": [{"from": "human", "value": "Explain recursion to a child."},
                                        {"from": "gpt", "value": long_en * 60_000}]},  # 5.2 MB
        {"id": "ok", "conversations": [{"from": "human", "value": "Explain recursion to a child."},
                                       {"from": "gpt", "value": long_en}]}]))
    p = params(sources={"sg": {"format": "sharegpt", "path": str(sg)}}, mixtures={"m": {"sg": 1}}, languages=[])
    rows, dropped, m = build(p, None, {})
    assert [r["id"] for r in rows] == ["sg:ok"] and m["dropped_by_reason"] == {"too_long": 1}
    assert m["malformed"] == 0 and m["sources"]["sg"]["malformed"] == 0
    assert dropped[0]["origin"].endswith("sg.json[0]") and f"{len(long_en) * 60_000} chars" in dropped[0]["detail"]
