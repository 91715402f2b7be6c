"""tokenize: templates, exact loss masks, deterministic splits, arrays read back by train/evaluate."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from stages.templates import ALPACA_NO_INPUT, encode_example, render_prompt
from stages.tokendata import IGNORE_INDEX, TokenSplit, collate
from stages.tokenize import assign_splits, encode_rows, tokenizer_id, write_split


def test_alpaca_templates():
    assert render_prompt("Name a fruit.", "", "alpaca") == ALPACA_NO_INPUT.format(instruction="Name a fruit.")
    p = render_prompt("Add them.", "2 and 3", "alpaca")
    assert "### Input:\n2 and 3\n\n### Response:\n" in p and "paired with an input" in p


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_mask_boundary_is_exact_and_eos_is_trained(tiny_tokenizer, template):
    tok = tiny_tokenizer
    prompt, response = encode_example("write the list", "a b c", "three words", template, tok)
    assert tok.decode([t for t in prompt if t != tok.bos_token_id]) == render_prompt("write the list", "a b c", template, tok)
    assert response[-1] == tok.eos_token_id
    assert response.count(tok.eos_token_id) == 1
    text = tok.decode(response[:-1], skip_special_tokens=True)
    assert text.strip() == "three words"
    # BOS once, from the tokenizer (alpaca) or not at all from a template that has none (chat)
    assert prompt.count(tok.bos_token_id) == (1 if template == "alpaca" else 0)
    # what evaluate feeds the model at inference (the same add_special_tokens rule) is exactly the prompt ids
    assert tok(render_prompt("write the list", "a b c", template, tok), add_special_tokens=template == "alpaca")["input_ids"] == prompt


def test_truncation_and_prompt_too_long(tiny_tokenizer):
    rows = [{"instruction": "write the list", "input": "", "output": " ".join(["word"] * 50)},
            {"instruction": " ".join(["the"] * 80), "input": "", "output": "x"}]
    (r1, ids1, mask1, why1), (r2, ids2, _, why2) = encode_rows(rows, tiny_tokenizer, "alpaca", 60)
    assert len(ids1) == 60 and len(mask1) == 60 and why1 == "truncated" and mask1[-1] == 1
    assert ids2 is None and why2 == "prompt_too_long"


def test_split_is_deterministic_stable_and_never_empty():
    rows = [{"instruction": f"task {i}", "input": ""} for i in range(200)]
    s1 = assign_splits(rows, 0.2, 0)
    assert s1 == assign_splits(rows, 0.2, 0)
    assert 20 < s1.count("val") < 60
    s_more = assign_splits(rows + [{"instruction": "new one", "input": ""}], 0.2, 0)
    assert s_more[:200] == s1  # adding an example moves no other example
    assert assign_splits(rows[:3], 0.01, 0).count("val") == 1
    assert assign_splits(rows, 0.2, 1) != s1


def test_arrays_round_trip_and_collate(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"instruction": "write the list", "input": "", "output": "a b"},
            {"instruction": "name three words", "input": "the a", "output": "it is"}]
    enc = list(encode_rows(rows, tok, "alpaca", 512))
    stats = write_split(tmp_path, "train", enc, np.uint16, "alpaca", tok)
    (tmp_path / "meta.json").write_text('{"dtype": "uint16", "tokenizer_id": "x"}')
    data = TokenSplit(tmp_path, "train")
    assert len(data) == 2 and stats["examples"] == 2
    for (_, ids, mask, _), i in zip(enc, range(2)):
        got_ids, got_mask = data[i]
        assert got_ids.tolist() == ids and got_mask.tolist() == mask
    assert stats["trained_tokens"] == sum(sum(m) for _, _, m, _ in enc)
    b = collate([data[0], data[1]], tok.pad_token_id)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    for i in range(2):
        ids, mask = data[i]
        lab = b["labels"][i, : len(ids)].tolist()
        assert lab == [t if m else IGNORE_INDEX for t, m in zip(ids.tolist(), mask.tolist())]
        assert (b["labels"][i, len(ids):] == IGNORE_INDEX).all()
    texts = pl.read_parquet(tmp_path / "train.parquet")
    assert texts["prompt"][1] == render_prompt("name three words", "the a", "alpaca")


def test_tokenizer_id_tells_tokenizers_apart(tiny_tokenizer):
    from tests.conftest import make_tokenizer

    assert tokenizer_id(tiny_tokenizer) == tokenizer_id(make_tokenizer())
    assert tokenizer_id(tiny_tokenizer) != tokenizer_id(make_tokenizer(["other words entirely"]))
