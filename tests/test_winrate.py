"""Win-rate arithmetic: AlpacaEval's Alpaca-7B figure from its GPT-4 annotations, and bias diagnostics."""

from __future__ import annotations

import json

import pytest

from stages.lib.judging.winrate import longer_wins_rate, position_flip_rate, win_rate
from tests.support.tiny import shared


def test_reproduces_alpaca_eval_alpaca_7b():
    ann = json.loads(shared("alpaca_eval", "alpaca-7b_vs_text_davinci_003_gpt4_annotations.json").read_text())
    res = win_rate(a["preference"] for a in ann)
    assert round(res["win_rate"], 2) == 26.46 and round(res["standard_error"], 2) == 1.54
    assert (res["n"], res["wins"], res["losses"], res["draws"]) == (805, 205, 584, 16)
    # GPT-4 preferred the longer answer in most decided comparisons (a known judge bias)
    rate = longer_wins_rate((a["output_1"], a["output_2"], a["preference"]) for a in ann)
    assert 0.5 < rate < 1


def test_draws_and_edge_cases():
    assert win_rate([1.5, 1.5])["win_rate"] == 50 and win_rate([1.5, 1.5])["standard_error"] == 0
    assert win_rate([2])["win_rate"] == 100 and win_rate([2])["standard_error"] == 0
    r = win_rate([1, 2])
    assert r["win_rate"] == 50 and r["standard_error"] == pytest.approx(50.0)
    with pytest.raises(ValueError):
        win_rate([3])


def test_position_flip_rate():
    # consistent: student wins in both orders (2 with reference first, 1 with student first)
    assert position_flip_rate([(2, 1), (1, 2)]) == 0
    # always picks the first answer shown: every verdict flips
    assert position_flip_rate([(1, 1), (1, 1)]) == 1
    assert position_flip_rate([(2, 1), (1, 1)]) == 0.5
