"""filter: rule filters, and the order of rules, novelty and near duplicates on rows (novelty itself: test_novelty)."""

from __future__ import annotations

import json

import pytest

from stages.filter import FilterParams, filter_rows
from stages.lib.text.rules import REASONS, blacklist_regex, rule_reason
from tests.support.tiny import shared

P = FilterParams()
BL = blacklist_regex(P.blacklist)


def row(instruction, input="", output="An answer.", id=None):
    return {"instruction": instruction, "input": input, "output": output, **({"id": id} if id else {})}


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
    assert reason is None or reason in REASONS  # every reason has its metrics entry


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


def test_filter_rows_records_scores_and_twins():
    seeds = ["Give three tips for staying healthy."]
    rows = [
        row("Give three tips for staying healthy today.", id="g0"),
        row("Explain how photosynthesis works in plants.", "", LONG, id="g1"),
        row("What happens inside a leaf when sunlight hits it?", "", LONG, id="g2"),
        row("Describe what a leaf does with light and water.", "", LONG, id="g3"),
    ]
    out = list(filter_rows(rows, seeds, FilterParams(minhash_threshold=0.5), seed_ids=["seed_7"]))
    assert out[0]["reason"] == "too_similar" and out[0]["rouge_nearest_id"] == "seed_7"
    assert out[0]["rouge_max"] > 0.7 and "seed_7" in out[0]["detail"]
    # the first example of the cluster is kept; the later ones name it, not each other
    assert [o["reason"] for o in out[1:]] == [None, "near_duplicate", "near_duplicate"]
    assert out[2]["minhash_twin_id"] == "g1" and out[3]["minhash_twin_id"] == "g1"
    assert out[1]["minhash_twin_id"] is None
    # every row the rules let through has its max score, kept or not
    assert all(isinstance(o["rouge_max"], float) for o in out)


def test_filter_rows_is_deterministic_and_uses_the_minhash_params(monkeypatch):
    rows = [row(f"Write a short poem about the number {i} and the sea.", "", LONG + f" Variant {i % 3}.", id=f"g{i}")
            for i in range(30)]
    p = FilterParams(rouge_threshold=1.0, minhash_threshold=0.7, minhash_num_perm=64, minhash_seed=7)
    out = list(filter_rows(rows, [], p))
    assert out == list(filter_rows(rows, [], p))
    assert out[0]["reason"] is None and sum(o["reason"] == "near_duplicate" for o in out) >= 20
    import datasketch

    made = []
    real = datasketch.MinHash.__init__
    monkeypatch.setattr(datasketch.MinHash, "__init__", lambda self, *a, **kw: made.append(kw) or real(self, *a, **kw))
    list(filter_rows(rows, [], p))
    assert made and all(kw == {"num_perm": 64, "seed": 7} for kw in made)


def test_instances_of_one_task_share_its_novelty_decision():
    seeds = ["Give three tips for staying healthy."]
    rows = [row("Convert the temperature from Celsius to Fahrenheit.", "20 C", "68 F", id="t0-0"),
            row("Convert the temperature from Celsius to Fahrenheit.", "0 C", "32 F", id="t0-1"),
            row("Give three tips for staying healthy today.", "", "Sleep.", id="t1-0"),
            row("Give three tips for staying healthy today.", "", "Walk.", id="t1-1"),
            row("Convert the temperature from Celsius to Fahrenheit.", "5 C", "41 F", id="gen-2")]
    for r, src in zip(rows, ["si-0", "si-0", "si-1", "si-1"]):
        r["source"] = f"self_instruct:{src}"
    rows[4]["source"] = "alpaca"
    out = list(filter_rows(rows, seeds, FilterParams()))
    # the Alpaca row repeating an instruction is a new task: ROUGE-L 1.0, rejected
    assert [o["reason"] for o in out] == [None, None, "too_similar", "too_similar", "too_similar"]
    assert out[1]["rouge_max"] == out[0]["rouge_max"] < 0.7 and out[4]["rouge_max"] == 1.0
