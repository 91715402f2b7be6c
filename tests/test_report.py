"""The report's figure data on inline data: verb-noun parse, counts, bins, funnel, series files, pages."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from stages.lib.errors import StageError
from stages.lib.report import data as rd
from stages.lib.report.page import render, render_compare
from stages.report import SERIES, ReportParams, read_series, reader, write_series
from tests.support.report_inputs import report_inputs as _inputs


@pytest.fixture(scope="module")
def nlp():
    return rd.load_parser(ReportParams().parser)


@pytest.mark.parametrize("text, pair", [
    ("Write a poem about the sea.", ("write", "poem")),
    ("Give me three tips for staying healthy.", ("give", "tip")),
    ("Summarize the article in two sentences.", ("summarize", "article")),
    ("Generate a list of five fruits.", ("generate", "list")),
    ("What is the capital of France?", None),  # no verb root
    ("Find the odd one out.", None),  # a verb root without a noun object
    ("Explain why the sky is blue.", None),  # a clause, not a noun, is the object
])
def test_verb_noun_of_fixed_sentences(nlp, text, pair):
    assert rd.verb_noun(nlp(text)) == pair


def test_verb_noun_takes_the_first_sentence_with_a_verb_root(nlp):
    assert rd.verb_noun(nlp("The weather today. Translate the text into French.")) == ("translate", "text")


def test_verb_noun_table_counts_and_ranks():
    pairs = [("write", "poem")] * 3 + [("write", "story")] * 2 + [("write", "essay"), ("give", "tip"), ("give", "tip"),
             ("give", "name"), ("add", "b"), ("add", "a"), None, None]
    rows = rd.verb_noun_table(pairs, top_verbs=2, top_nouns=2)
    assert [(r["verb"], r["noun"], r["count"]) for r in rows] == [
        ("write", "poem", 3), ("write", "story", 2), ("give", "tip", 2), ("give", "name", 1)]
    assert {r["verb"]: r["verb_count"] for r in rows} == {"write": 6, "give": 3}
    # ties (add's nouns a and b) break alphabetically, whatever the input order
    rows3 = rd.verb_noun_table(list(reversed(pairs)), top_verbs=3, top_nouns=1)
    assert [(r["verb"], r["noun"]) for r in rows3] == [("write", "poem"), ("give", "tip"), ("add", "a")]


def test_histogram_counts_bins_and_named_series():
    edges = np.linspace(0, 1, 5)
    rows = rd.histogram([0.0, 0.1, 0.25, 0.5, 0.99, 1.0, 1.5], edges)
    assert [(r["bin_start"], r["bin_end"]) for r in rows] == [(0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert [r["count"] for r in rows] == [2, 1, 1, 2]  # 1.0 falls in the closed last bin, 1.5 outside
    two = rd.histogram(None, edges, kept=[0.1, 0.2], too_similar=[0.8])
    assert [(r["kept"], r["too_similar"]) for r in two] == [(2, 0), (0, 0), (0, 0), (0, 1)] and "count" not in two[0]
    right = rd.histogram([0.0, 0.25, 0.26, 0.5, 1.0, -0.1], edges, closed="right")
    assert [r["count"] for r in right] == [2, 2, 0, 1]  # (a, b]: 0.25 and 0.5 count left of their edge


@pytest.mark.parametrize("threshold, window, bins", [(0.7, 0.2, 20), (0.9, 0.2, 10), (0.1, 0.3, 7)])
def test_threshold_edges_put_the_threshold_on_an_edge(threshold, window, bins):
    e = rd.threshold_edges(threshold, window, bins)
    assert np.isclose(e, threshold).any()
    assert e[0] >= -1e-9 and e[-1] <= 1 + 1e-9 and np.allclose(np.diff(e), np.diff(e)[0])
    assert e[0] <= max(0, threshold - window) + 1e-9 + np.diff(e)[0]


def test_rouge_vs_seeds_is_the_max_over_seeds_only():
    from rouge_score import rouge_scorer

    seeds = ["Write a poem about the sea.", "List three fruits.", "Classify the sentiment of a review."]
    cands = ["Write a short poem about the sea.", "Write a short poem about the sea!", "List three red fruits.",
             "Tell me a joke."]
    got = rd.rouge_vs_seeds(seeds, cands)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    want = [max(scorer.score(s, c)["rougeL"].fmeasure for s in seeds) for c in cands]
    assert got.tolist() == want
    assert got[1] < 1.0  # the identical earlier candidate is not in the pool


def test_length_edges_and_token_lengths(tiny_tokenizer):
    rows = [{"instruction": "name a fruit", "input": "", "output": "write the list of three words"},
            {"instruction": "write", "input": None, "output": "a"}]
    lengths = rd.token_lengths(rows, tiny_tokenizer)
    for f in ("instruction", "input", "output"):
        want = [len(tiny_tokenizer(r[f] or "", add_special_tokens=False)["input_ids"]) for r in rows]
        assert lengths[f].tolist() == want
    assert lengths["input"].tolist() == [0, 0]
    edges = rd.length_edges(np.array([0, 3, 95]), bins=10)
    assert edges[0] == 0 and edges[-1] > 95 and len(edges) - 1 == 10 and np.all(np.diff(edges) == 10)
    assert rd.length_edges(np.array([3]), bins=10).tolist() == [0, 1, 2, 3, 4]


FILTER_M = {"generated": 100, "unparsed": 30, "parsed": 70, "kept": 40, "rejected": 30,
            "dropped_by_reason": {"too_short": 5, "blacklist": 3, "input_equals_output": 2, "too_similar": 15,
                                   "near_duplicate": 5}}


def test_funnel_counts_every_step():
    rows = rd.funnel(FILTER_M)
    steps = [r["step"] for r in rows]
    assert steps[:2] == ["generated", "parsed"]
    assert steps[-3:] == ["novelty (ROUGE-L)", "near duplicate (MinHash)", "kept"]
    assert len(steps) == 2 + len(rd.RULE_REASONS) + 3
    left = {r["step"]: r["left"] for r in rows}
    assert left["generated"] == 100 and left["parsed"] == 70 and left["rule: too_short"] == 65
    assert left["novelty (ROUGE-L)"] == 45 and left["kept"] == 40
    assert sum(r["dropped"] for r in rows) == 60
    with pytest.raises(ValueError, match="filter kept 41"):
        rd.funnel({**FILTER_M, "kept": 41})


def test_languages_judge_and_losses():
    langs = rd.languages(["en", "en", "en", "de"], ["fr", "de"])
    assert [(r["language"], r["kept"], r["dropped"], r["share"]) for r in langs] == [
        ("en", 3, 0, 0.5), ("de", 1, 1, 0.3333), ("fr", 0, 1, 0.1667)]
    assert rd.judge({}) == [] and rd.judge({"judge": {}}) == []
    assert rd.judge({"judge": {"empty": {"win_rate": float("nan"), "standard_error": float("nan"), "n": 0}}}) == []
    rows = rd.judge({"judge": {"alpaca_eval": {"win_rate": 26.46, "standard_error": 1.54, "n": 805, "wins": 200,
                                               "position_flip_rate": 0.25},
                               "b": {"win_rate": 99.0, "standard_error": 2.0, "n": 10}}})
    assert [r["eval_set"] for r in rows] == ["alpaca_eval", "b"]
    assert rows[0]["low"] == pytest.approx(26.46 - 1.96 * 1.54)
    assert rows[0]["high"] == pytest.approx(26.46 + 1.96 * 1.54)
    assert rows[1]["high"] == 100.0  # clipped
    assert rows[0]["wins"] == 200 and rows[0]["position_flip_rate"] == 0.25 and rows[1]["wins"] is None
    series = {"loss": [(0, 2.0)], "val_loss": [(0, 2.5)], "tokens_per_s": [(0, 9.0)]}
    assert rd.loss_series(series) == {"train": [(0, 2.0)], "validation": [(0, 2.5)]}
    assert rd.parse_tsv("step\tloss\n0\t1.5\n1\t1.25\n") == [(0.0, 1.5), (1.0, 1.25)]


def test_sample_rows_are_seeded_and_in_order():
    rows = [{"id": i, "x": i * 2} for i in range(100)]
    a, b = rd.sample_rows(rows, 20, 0, ["id"]), rd.sample_rows(rows, 20, 0, ["id"])
    ids = [r["id"] for r in a]
    assert a == b and len(set(ids)) == 20 and ids == sorted(ids) and set(a[0]) == {"id"}
    assert ids != [r["id"] for r in rd.sample_rows(rows, 20, 1, ["id"])]
    assert len(rd.sample_rows(rows[:5], 20, 0, ["id"])) == 5


def test_tables_round_trip_through_series_files(nlp, tmp_path):
    tables, summary, *_ = _inputs(nlp)
    assert summary["verb_noun_pairs"] == 3 and summary["share_with_input"] == 0.5 and summary["judge"] is False
    assert sum(r["count"] for r in tables["rouge_seeds"]) == 4
    assert sum(r["kept"] for r in tables["rouge_threshold"]) == 3  # 0.3 is below the 0.5-0.9 window
    assert sum(r["too_similar"] for r in tables["rouge_threshold"]) == 1
    assert [(r["language"], r["kept"], r["dropped"]) for r in tables["languages"]] == [("de", 0, 1), ("en", 1, 0)]
    assert tables["training"] == [{"step": 0, "loss": 2.0, "padding_efficiency": 0.5},
                                  {"step": 1, "loss": 1.5, "padding_efficiency": 0.6}]
    write_series(tmp_path, tables, summary)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{n}.csv" for n in SERIES] + ["summary.json"])
    tables["verb_noun"][0]["noun"] = "inf"  # a word that float() would take
    write_series(tmp_path, tables, summary)
    back, summary2 = read_series(reader(str(tmp_path), "unused"))
    assert summary2 == json.loads(json.dumps(summary))
    for name in SERIES:
        assert back[name] == [{k: v for k, v in r.items()} for r in tables[name]], name


def test_page_has_every_figure_and_says_when_there_is_no_judge(nlp):
    tables, summary, kept, rejected = _inputs(nlp)
    text = render(tables, summary, kept, rejected)
    assert text.count('<figure class="figure"') == 8 and 'id="fig-judge"' not in text
    assert "No judge evaluation in this run." in text
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "Draw a map" in text and "too_similar" in text


def test_the_page_says_when_the_judge_is_only_a_smoke_test(nlp):
    judge = {"alpaca": {"win_rate": 40.0, "standard_error": 5.0, "n": 8}}
    for smoke in (True, False):
        tables, summary, kept, rejected = _inputs(nlp, judge=judge, smoke=smoke)
        assert summary["judge_smoke_test_only"] is smoke
        text = render(tables, summary, kept, rejected)
        assert 'id="fig-judge"' in text and ("SMOKE TEST ONLY: the judge is the embedded model" in text) is smoke


def test_compare_reads_two_git_revisions(nlp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def git(*args):
        subprocess.run(["git", *args], check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    tables, summary, *_ = _inputs(nlp)
    write_series(tmp_path / "metrics/report", tables, summary)
    git("add", "-A")
    git("commit", "-qm", "a")
    git("tag", "a")
    tables, summary, *_ = _inputs(nlp, judge={"alpaca": {"win_rate": 40.0, "standard_error": 5.0, "n": 8}})
    write_series(tmp_path / "metrics/report", tables, summary)
    git("commit", "-qam", "b")
    git("update-ref", "refs/exps/ab/cdef/my-exp", "HEAD")  # where DVC keeps an experiment
    sa, sb = (read_series(reader(r, "metrics/report")) for r in ("a", "my-exp"))
    assert sa[0]["judge"] == [] and [r["eval_set"] for r in sb[0]["judge"]] == ["alpaca"]
    text = render_compare("a", "my-exp", sa, sb)
    assert text.count('<figure class="figure"') == 17 and text.count('class="cols"') == 9
    assert 'id="fig-judge-my-exp"' in text and 'id="note-judge-a"' in text
    assert read_series(reader("HEAD~1", "nowhere")) is None
    with pytest.raises(StageError, match="neither a folder"):
        reader("no-such-exp", "metrics/report")
