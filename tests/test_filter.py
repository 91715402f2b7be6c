"""filter: rule filters, exact ROUGE-L (checked against rouge_score on real data), near duplicates."""

from __future__ import annotations

import json
import random

import pytest

from stages.filter import FilterParams, NoveltyPool, blacklist_regex, filter_rows, rouge_l_f1, rouge_tokens, rule_reason
from tests.conftest import shared

P = FilterParams()
BL = blacklist_regex(P.blacklist)


def row(instruction, input="", output="An answer."):
    return {"instruction": instruction, "input": input, "output": output}


@pytest.mark.parametrize(
    "r, reason",
    [
        (row("Name three colours."), "too_short"),
        (row(" ".join(["word"] * 151)), "too_long"),
        (row("Describe the picture in detail please."), "blacklist"),
        (row("Tell me what this Plot twist means."), "blacklist"),
        (row("Give directions to go to the station."), "blacklist"),
        (row("Write a program that sorts a list."), "write_a_program"),
        (row('"Explain" what this word means here.'), "punctuation_start"),
        (row("Ébauchez une lettre pour mon ami."), "non_ascii_start"),
        (row("Explain why the sky is blue.", output="  "), "empty_output"),
        (row("Repeat the sentence back to me.", "Hello there.", "Hello there."), "input_equals_output"),
        (row("Explain why the sky is blue today."), None),
        (row("Describe the mapping between keys here."), None),  # 'map' only as a whole word
    ],
)
def test_rules(r, reason):
    assert rule_reason(r, P, BL) == reason


def test_rouge_tokens_match_rouge_score_tokenizer():
    from rouge_score import tokenize

    for text in ["Hello, World! It's 2023.", "naïve café ÜBER déjà-vu", "  ", "a_b c-d e.f 3.14"]:
        assert rouge_tokens(text) == tokenize.tokenize(text, None)


def test_rouge_l_equals_rouge_score_on_real_instructions():
    """Exact float equality with rouge_score on pairs of alpaca-libre generations and seeds."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    gen = [json.loads(x)["instruction"] for x in shared("alpaca-libre", "alpaca_libre_tasks_v1.jsonl").read_text().splitlines()]
    seeds = [json.loads(x)["instruction"] for x in shared("self-instruct", "seed_tasks.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    pairs = [(rng.choice(gen), rng.choice(gen + seeds)) for _ in range(3000)]
    pairs += [(g, g.upper()) for g in gen[:50]] + [(g, "") for g in gen[:5]]
    for a, b in pairs:
        want = scorer.score(b, a)["rougeL"].fmeasure  # score(target, prediction)
        assert rouge_l_f1(rouge_tokens(a), rouge_tokens(b)) == want, (a, b)


def test_novelty_pool_finds_the_nearest():
    pool = NoveltyPool(["Give three tips for staying healthy.", "Translate the sentence into French."])
    score, nearest = pool.best("Give three tips for staying happy.")
    assert nearest == "Give three tips for staying healthy." and 0.8 < score < 0.9
    assert pool.best("Completely unrelated words here.")[0] < 0.3


LONG = ("Plants capture light with chlorophyll in their leaves, split water into hydrogen and oxygen, "
        "and use the energy to turn carbon dioxide from the air into sugar, releasing oxygen as a by-product.")


def test_filter_rows_order_and_reasons():
    seeds = ["Give three tips for staying healthy."]
    rows = [
        row("Give three tips for staying healthy today."),  # too similar to the seed
        row("Summarize the article about climate change.", "Long text about the climate.", "It is warming."),
        row("Summarize the article about climate change please."),  # similar to the previous kept row
        row("Explain how photosynthesis works in plants.", "", LONG),
        row("What happens inside a leaf when sunlight hits it?", "", LONG),  # new instruction, same answer
        row("Name two colours."),  # rule: too short
    ]
    out = list(filter_rows(rows, seeds, FilterParams(rouge_threshold=0.7, minhash_threshold=0.5)))
    assert [o["reason"] for o in out] == ["too_similar", None, "too_similar", None, "near_duplicate", "too_short"]
    assert "Give three tips" in out[0]["detail"]
    assert out[2]["rouge_nearest"] == rows[1]["instruction"]  # compared against earlier *kept* rows
    assert out[1]["rouge_max"] < 0.7


def test_rejected_rows_do_not_join_the_pool():
    rows = [row("Plan a weekend trip to the mountains."), row("Plan a weekend trip to the mountains now."),
            row("Plan a weekend trip to the mountains today.")]
    out = list(filter_rows(rows, [], FilterParams(rouge_threshold=0.7)))
    assert [o["reason"] for o in out] == [None, "too_similar", "too_similar"]
    assert out[2]["rouge_nearest"] == rows[0]["instruction"]


def test_filter_on_alpaca_libre_agrees_with_its_rule_verdicts():
    """alpaca-libre marked 'blacklist' and 'too short' rows with Alpaca's rules; ours reject them too."""
    recs = [json.loads(x) for x in shared("alpaca-libre", "alpaca_libre_tasks_v1.jsonl").read_text().splitlines()]
    for r in recs:
        reason = rule_reason(r, P, BL)
        if r["status"] == "blacklist":
            assert reason == "blacklist", r["instruction"]
        if r["status"] == "too short":
            assert reason in ("too_short", "empty_output"), r["instruction"]
