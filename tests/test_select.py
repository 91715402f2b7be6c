"""Selection: policy arithmetic on inline scores, AlpaGasus rating parsing, IFD against a direct computation."""

from __future__ import annotations

import math

import pytest

from stages.lib.errors import StageError
from stages.lib.params import params_from_dict
from stages.lib.selection.policy import Policy, apply, combined, percentile_ranks
from stages.lib.selection.rating import parse_rating, rating_prompt
from stages.select import SelectParams, choose, metrics_of, rate


def pol(**d) -> Policy:
    return Policy.from_dict(d)


def test_threshold_keeps_at_or_above_and_never_treats_unknown_as_zero():
    scores = [4.5, 3.0, None, 5.0, 4.49]
    keep, why, cut = apply(pol(score="rating", threshold=4.5), scores)
    assert keep == [True, False, False, True, False] and cut == 4.5
    assert why == [None, "rating_below_threshold", "unknown_rating", None, "rating_below_threshold"]
    # a threshold of 0 keeps every known score, still not the unknown one (it is not a 0)
    assert apply(pol(score="rating", threshold=0), scores)[0] == [True, True, False, True, True]
    assert apply(pol(score="rating", threshold=0), scores, keep_unknown=True)[0] == [True] * 5


def test_top_k_and_top_fraction_with_ties_to_the_earlier_row():
    scores = [0.2, 0.9, 0.5, 0.9, None, 0.1, 0.5]
    keep, why, cut = apply(pol(score="ifd", top_k=3), scores)
    assert keep == [False, True, True, True, False, False, False] and cut == 0.5  # the 0.5 at index 2 wins the tie
    assert why[4] == "unknown_ifd" and why[6] == "ifd_not_in_top_k"
    # 6 known scores: 50% is 3 rows, 10% rounds up to 1 row, 0% keeps none
    assert apply(pol(score="ifd", top_fraction=0.5), scores)[0] == keep
    assert sum(apply(pol(score="ifd", top_fraction=0.1), scores)[0]) == 1
    k0, _, cut0 = apply(pol(score="ifd", top_k=0), scores)
    assert not any(k0) and cut0 is None
    assert sum(apply(pol(score="ifd", top_k=100), scores)[0]) == 6


def test_percentile_ranks_and_combined():
    assert percentile_ranks([3.0, 1.0, None, 2.0]) == [1.0, 0.0, None, 0.5]
    assert percentile_ranks([1.0, 1.0, 2.0]) == [0.25, 0.25, 1.0]  # ties share their mean rank
    both = combined({"rating": [5.0, 4.0, 3.0, None], "ifd": [0.1, 0.9, 0.5, 0.3]})
    assert both[:3] == [pytest.approx((1.0 + 0.0) / 2), pytest.approx((0.5 + 1.0) / 2), pytest.approx((0.0 + 0.5) / 2)]
    assert both[3] is None


@pytest.mark.parametrize("bad, msg", [
    ({"score": "rating"}, "exactly one of"),
    ({"score": "rating", "threshold": 4, "top_k": 3}, "exactly one of"),
    ({"score": "length", "threshold": 4}, "policy.score"),
    ({"score": "ifd", "top_fraction": 1.5}, "top_fraction"),
    ({"score": "ifd", "top_k": -1}, "top_k"),
    ({"score": "ifd", "treshold": 1}, "unknown key"),
])
def test_bad_policies_are_named(bad, msg):
    with pytest.raises(ValueError, match=msg):
        Policy.from_dict(bad)


def test_params_policy_must_match_the_computed_scores():
    with pytest.raises(StageError, match="needs select.method"):
        params_from_dict(SelectParams, {"method": "rating", "policy": {"score": "ifd", "top_k": 3}})
    with pytest.raises(StageError, match="needs select.method both"):
        params_from_dict(SelectParams, {"method": "ifd", "policy": {"score": "combined", "top_k": 3}})
    assert params_from_dict(SelectParams,
                            {"method": "both", "policy": {"score": "combined", "top_k": 3}}).pol.kind == "top_k"


@pytest.mark.parametrize("text, score", [
    ("Score: 4.5/5", 4.5),
    ("**4**\nThe response is accurate.", 4.0),
    ("I'd give it a 3", 3.0),
    ("5\nThe answer is complete and correct.", 5.0),
    ("On a scale of 0 to 5, I rate this response 2.", 2.0),
    ("Rating: 4. Mostly right, 2 small errors.", 4.0),
    ("8/10", 4.0),
    ("3 out of 5", 3.0),
    ("Accuracy score - 1", 1.0),
    ("The response is excellent.", None),
    ("banana", None),
    ("", None),
    (None, None),
    ("7", None),  # out of the 0-5 scale
    ("Score: 6/5", None),
])
def test_parse_rating_odd_verdicts(text, score):
    assert parse_rating(text) == score


def test_rating_prompt_is_alpagasus_accuracy_prompt():
    p = rating_prompt("Name a fruit.", "", "Apple.")
    assert "Instruction: Name a fruit." in p and "Input: (none)" in p and "Response: Apple." in p
    assert "scale of 0 to 5" in p and "accuracy" in p and p.startswith("We would like to request your feedback")


def rows(n: int) -> list[dict]:
    return [{"id": f"t{i}", "instruction": f"Task number {i}.", "input": "",
             "output": f"Answer {i}."} for i in range(n)]


def test_rate_counts_unknown_and_failed_and_choose_rejects_them():
    verdicts = ["Score: 5", "4.5/5", "no idea", None, "**3**"]
    seen = []

    def ask(prompts, sampling):
        seen.append((len(prompts), sampling.temperature))
        return [None if v is None else {"text": v} for v in verdicts]

    p = params_from_dict(SelectParams, {"method": "rating", "policy": {"score": "rating", "threshold": 4.5}})
    rs = rows(5)
    got = rate(rs, ask, p)
    assert seen == [(5, 0.0)] and got == {"failed": 1, "unknown": 2}
    assert [r["rating"] for r in rs] == [5.0, 4.5, None, None, 3.0]
    cut = choose(rs, p)
    assert cut == 4.5
    assert [r["reason"] for r in rs] == [None, None, "unknown_rating", "unknown_rating", "rating_below_threshold"]
    m = metrics_of(rs, p, cut)
    assert (m["kept"], m["rejected"], m["scores"]["rating"]["unknown"]) == (2, 3, 2)
    assert sum(m["scores"]["rating"]["kept"]) == 2 and sum(m["scores"]["rating"]["rejected"]) == 1


def test_method_none_keeps_every_row():
    p = SelectParams()
    rs = rows(4)
    assert choose(rs, p) is None and all(r["reason"] is None and r["rating"] is None for r in rs)
    assert metrics_of(rs, p, None)["kept"] == 4


def test_ifd_policy_drops_ifd_at_or_above_max_first():
    p = params_from_dict(SelectParams, {"method": "ifd", "policy": {"score": "ifd", "top_k": 2}})
    rs = rows(4)
    for r, v in zip(rs, [0.5, 1.2, 0.9, 0.7]):
        r["ifd"] = v
    choose(rs, p)
    assert [r["reason"] for r in rs] == ["ifd_not_in_top_k", "ifd_at_or_above_max", None, None]


def test_ifd_against_a_direct_computation(tiny_model):
    """Batched, padded IFD equals one-example-at-a-time HF losses with the prompt masked."""
    import torch

    from stages.lib.llm.local import load_model
    from stages.lib.selection.ifd import ifd_scores
    from tests.support.helpers import encode_example

    model, tok = load_model(str(tiny_model))
    examples = [{"instruction": "Name a fruit.", "input": "", "output": "An apple is a fruit."},
                {"instruction": "Write three words.", "input": "a list", "output": "one two three"},
                {"instruction": "Say hi.", "input": "", "output": "hi"}]
    got = ifd_scores(examples, model, tok, "alpaca", 512, batch_size=2)
    for ex, (ifd, lc, la) in zip(examples, got):
        prompt, resp = encode_example(ex["instruction"], ex["input"], ex["output"], "alpaca", tok)
        with torch.no_grad():
            ids = torch.tensor([prompt + resp])
            want_c = model(input_ids=ids, labels=torch.tensor([[-100] * len(prompt) + resp])).loss.item()
            alone = torch.tensor([[tok.bos_token_id] + resp])
            want_a = model(input_ids=alone, labels=torch.tensor([[-100] + resp])).loss.item()
        assert lc == pytest.approx(want_c, rel=1e-4) and la == pytest.approx(want_a, rel=1e-4)
        assert ifd == pytest.approx(want_c / want_a, rel=1e-4) and math.isfinite(ifd)
    # a length cap that leaves no response token: no score, not a crash
    assert ifd_scores(examples[:1], model, tok, "alpaca", 4, 1) == [(None, None, None)]


def test_report_draws_the_selection_with_its_cut():
    from stages.lib.report import data as rd

    rs = rows(5)
    for r, v in zip(rs, [5.0, 4.5, None, 2.0, 3.0]):
        r["rating"] = v
    p = params_from_dict(SelectParams, {"method": "rating", "policy": {"score": "rating", "threshold": 4.5},
                                        "histogram_bins": 5})
    m = metrics_of(rs, p, choose(rs, p))
    table = rd.selection(m)
    assert [(t["bin_start"], t["kept"], t["rejected"]) for t in table] == [
        (0.0, 0, 0), (1.0, 0, 0), (2.0, 0, 1), (3.0, 0, 1), (4.0, 2, 0)]
    none, plain = SelectParams(), rows(2)
    assert rd.selection(metrics_of(plain, none, choose(plain, none))) == []  # method none: no figure
    from stages.lib.report.figures import fig_selection

    fig = fig_selection(table, "rating", m["cut"], m["policy"])
    lines = [ln for ln in fig.axes[0].get_lines() if list(ln.get_xdata()) == [4.5, 4.5]]
    assert len(lines) == 1 and "rating >= 4.5" in fig.axes[0].get_title()


def test_stage_method_none_passes_the_filtered_rows_through(in_tmp):
    """The default: ingest sees exactly the filter's kept rows, in order; no judge, no model; the cache
    folder (a DVC output) exists all the same."""
    import polars as pl

    from stages.lib.io import write_shards
    from stages.select import main
    from tests.support.tiny import write_params

    df = pl.DataFrame(rows(5)).with_columns(pl.lit(0.3).alias("rouge_max"))
    write_shards(df, in_tmp / "data/filtered", "kept")
    write_params(in_tmp / "params.yaml", {"select": {}})
    main()
    kept = pl.read_parquet(in_tmp / "data/selected/kept-00000.parquet")
    assert kept.select(df.columns).equals(df) and kept["rating"].null_count() == 5
    assert pl.read_parquet(in_tmp / "data/selected/rejected-00000.parquet").height == 0
    assert (in_tmp / "data/select_cache").is_dir()
    import json

    m = json.loads((in_tmp / "metrics/select.json").read_text())
    assert (m["kept"], m["rejected"], m["judge"]["calls"], m["policy"]) == (5, 0, 0, None)


def test_stage_ifd_scores_with_the_student_model_and_the_tokenize_template(in_tmp, tiny_model):
    """method ifd: the stage reads `student.model` and `tokenize.template` (dvc.yaml declares both),
    and its scores equal ifd_scores with that model and template."""
    import polars as pl

    from stages.lib.io import write_shards
    from stages.lib.llm.local import load_model
    from stages.lib.selection.ifd import ifd_scores
    from stages.select import main
    from tests.support.tiny import write_params

    df = pl.DataFrame(rows(4)).with_columns(pl.lit(0.3).alias("rouge_max"))
    write_shards(df, in_tmp / "data/filtered", "kept")
    write_params(in_tmp / "params.yaml", {"student": {"model": str(tiny_model)}, "tokenize": {"template": "chat"},
                                          "select": {"method": "ifd", "ifd_max": 0,
                                                     "policy": {"score": "ifd", "top_k": 2}}})
    main()
    out = pl.concat([pl.read_parquet(p) for p in sorted((in_tmp / "data/selected").glob("*.parquet"))],
                    how="diagonal").sort("id")  # rejected rows add step and detail
    model, tok = load_model(str(tiny_model))
    want = ifd_scores(df.sort("id").to_dicts(), model, tok, "chat", 512, 8)
    assert out["ifd"].to_list() == pytest.approx([w[0] for w in want], rel=1e-5)
    assert out["ifd"].to_list() != pytest.approx([w[0] for w in ifd_scores(df.sort("id").to_dicts(), model, tok,
                                                                            "alpaca", 512, 8)], rel=1e-5)
    assert pl.read_parquet(in_tmp / "data/selected/kept-00000.parquet").height == 2


def test_policy_params_typed_with_a_hint_for_two_kinds():
    """A mapping without threshold is one kind; `-S select.policy.top_k=3` over the default threshold names the fix."""
    p = params_from_dict(SelectParams, {"method": "ifd", "policy": {"score": "ifd", "top_fraction": 0.1}})
    assert (p.pol.kind, p.pol.value) == ("top_fraction", 0.1)
    assert SelectParams().pol.describe() == "rating >= 4.5"
    with pytest.raises(StageError, match=r"^select\.policy: give exactly one.*select.policy.threshold=null"):
        params_from_dict(SelectParams,
                         {"method": "rating", "policy": {"score": "rating", "threshold": 4.5, "top_k": 3}})
    with pytest.raises(StageError, match=r"policy.top_k: expected int"):
        params_from_dict(SelectParams, {"policy": {"top_k": "many"}})
    with pytest.raises(StageError, match=r"model_family"):
        params_from_dict(SelectParams, {"judge": {"model": "o3-mini", "model_family": "clever"}})


def test_policy_errors_name_select_policy(tmp_path):
    """The key as `-S` and the docs name it (`select.policy`), not `params.yaml: policy:`."""
    import re

    import yaml

    from stages.lib.params import load_params

    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"select": {"method": "rating", "policy": {"score": "rating", "threshold": 4.5,
                                                                           "top_k": 10}}}))
    with pytest.raises(StageError, match=r"^" + re.escape(f"{f}: select.policy: give exactly one of threshold, top_k")):
        load_params(SelectParams, "select", f)
    with pytest.raises(StageError, match=r"^select\.policy\.score ifd: needs select\.method both or ifd, got 'ra"):
        params_from_dict(SelectParams, {"method": "rating", "policy": {"score": "ifd", "top_k": 3}})
