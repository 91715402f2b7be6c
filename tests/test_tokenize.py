"""tokenize: templates, exact loss masks, deterministic splits, arrays read back by train/evaluate."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from stages.lib.tokens.arrays import TokenSplit, tokenizer_id, write_split
from stages.lib.tokens.templates import ALPACA_NO_INPUT, encode_conversation, render_prompt, user_message
from stages.lib.training.batches import IGNORE_INDEX, collate
from stages.tokenize import (
    TokenizeParams,
    assign_splits,
    example_texts,
    first_user_message,
    pieces,
    split_of,
    tokenize_conversations,
)
from tests.support.helpers import encode_example


def conv(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for k, t in enumerate(turns):
        msgs.append({"role": "user" if k % 2 == 0 else "assistant", "content": t})
    return msgs


def encode_rows(rows, tok, template, max_seq_len):
    """Single-round conversations from Alpaca rows, as tokenize sees them: (texts, ids, mask, reason)."""
    for r in rows:
        msgs = conv(user_message(r["instruction"], r["input"]), r["output"])
        for m, ids, mask, _, why in pieces(msgs, tok, template, max_seq_len):
            yield {"id": "x", "source": "t", **example_texts(m, template, tok)}, ids, mask, why


def test_alpaca_templates():
    assert render_prompt("Name a fruit.", "", "alpaca") == ALPACA_NO_INPUT.format(instruction="Name a fruit.")
    p = render_prompt("Add them.", "2 and 3", "alpaca")
    assert "### Input:\n2 and 3\n\n### Response:\n" in p and "paired with an input" in p


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_mask_boundary_is_exact_and_eos_is_trained(tiny_tokenizer, template):
    tok = tiny_tokenizer
    prompt, response = encode_example("write the list", "a b c", "three words", template, tok)
    assert tok.decode([t for t in prompt if t != tok.bos_token_id]) == \
        render_prompt("write the list", "a b c", template, tok)
    assert response[-1] == tok.eos_token_id
    assert response.count(tok.eos_token_id) == 1
    text = tok.decode(response[:-1], skip_special_tokens=True)
    assert text.strip() == "three words"
    # BOS once, from the tokenizer (alpaca) or not at all from a template that has none (chat)
    assert prompt.count(tok.bos_token_id) == (1 if template == "alpaca" else 0)
    # what evaluate feeds the model at inference (the same add_special_tokens rule) is exactly the prompt ids
    assert tok(render_prompt("write the list", "a b c", template, tok),
               add_special_tokens=template == "alpaca")["input_ids"] == prompt


def test_truncation_and_prompt_too_long(tiny_tokenizer):
    rows = [{"instruction": "write the list", "input": "", "output": " ".join(["word"] * 50)},
            {"instruction": " ".join(["the"] * 80), "input": "", "output": "x"}]
    (_, ids1, mask1, why1), (_, ids2, _, why2) = encode_rows(rows, tiny_tokenizer, "alpaca", 60)
    assert len(ids1) == 60 and len(mask1) == 60 and why1 == "truncated" and mask1[-1] == 1
    assert ids2 is None and why2 == "prompt_too_long"


def test_split_is_deterministic_stable_and_never_empty():
    keys = [f"task {i}" for i in range(200)]
    s1 = assign_splits(keys, 0.2, 0)
    assert s1 == assign_splits(keys, 0.2, 0)
    assert 20 < s1.count("val") < 60
    s_more = assign_splits(keys + ["new one"], 0.2, 0)
    assert s_more[:200] == s1  # adding an example moves no other example
    assert assign_splits(keys[:3], 0.01, 0).count("val") == 1
    assert assign_splits(keys, 0.2, 1) != s1


def test_split_hash_is_the_one_existing_splits_were_made_with():
    """The split key is the first user message, hashed as it always was (with the empty Alpaca input
    after it), so no conversation changes split."""
    import hashlib

    for key, salt in [("task 7", 0), ("Name a fruit.", 3), ("", 0)]:
        old = hashlib.sha256(f"{salt}\x00{key}\x00{''}".encode()).digest()
        assert split_of(key, salt) == int.from_bytes(old[:8], "big") / 2**64
    assert first_user_message([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == "u"
    assert first_user_message([]) == ""


def test_the_token_format_imports_no_training_code():
    """stages/lib/tokens/ is the on-disk format only: tokenize does not depend on training code."""
    import ast

    import yaml

    from tests.support.tiny import ROOT

    for path in (ROOT / "stages/lib/tokens").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("stages.lib.training"), path
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["tokenize"]["deps"]
    assert "stages/lib/tokens/arrays.py" in deps and not [d for d in deps if d.startswith("stages/lib/training/")]


def test_arrays_round_trip_and_collate(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"instruction": "write the list", "input": "", "output": "a b"},
            {"instruction": "name three words", "input": "the a", "output": "it is"}]
    enc = list(encode_rows(rows, tok, "alpaca", 512))
    stats = write_split(tmp_path, "train", [e[:3] for e in enc], np.uint16)
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
    assert texts["prompt"][1] == render_prompt("name three words\n\nthe a", "", "alpaca")


def test_tokenizer_id_tells_tokenizers_apart(tiny_tokenizer):
    from tests.support.tiny import make_tokenizer

    assert tokenizer_id(tiny_tokenizer) == tokenizer_id(make_tokenizer())
    assert tokenizer_id(tiny_tokenizer) != tokenizer_id(make_tokenizer(["other words entirely"]))


# ---------------------------------------------------------------- conversations (multi-turn)

TURNS = ("write the list", "a b c", "name a fruit", "pear", "three words", "the a b")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("system", [None, "be brief"])
def test_golden_multi_turn_masks(tiny_tokenizer, template, system):
    """Decoded ids equal the rendered text, and the mask covers exactly the assistant turns."""
    from stages.lib.tokens.templates import conversation_segments

    tok = tiny_tokenizer
    msgs = conv(*TURNS, system=system)
    ids, mask = encode_conversation(msgs, template, tok)
    segs = conversation_segments(msgs, template, tok)
    rendered = "".join(t for t, _ in segs)
    if template == "chat":
        full = tok.apply_chat_template(msgs, tokenize=False)
        assert rendered == full.rstrip("\n")
    else:
        assert rendered.startswith((system + "\n\n" if system else "") + render_prompt(TURNS[0], "", "alpaca"))
    decoded = tok.decode(ids)
    eos = tok.eos_token
    if template == "alpaca":  # BOS from the tokenizer, EOS after every answer
        assert decoded == tok.bos_token + "".join(t + (eos if trained else "") for t, trained in segs)
    else:
        # the last answer ends with EOS (appended when the template's end-of-turn token is another)
        assert decoded == rendered + ("" if rendered.endswith(eos) else eos)
    # the trained spans, decoded, are exactly the assistant turns with their end-of-turn token
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    answers = [TURNS[1], TURNS[3], TURNS[5]]
    assert len(spans) == 3
    for span, answer in zip(spans, answers):
        assert span[-1] == tok.eos_token_id or tok.decode(span).endswith("<|im_end|>")
        assert tok.decode(span, skip_special_tokens=True).strip() == answer


def test_long_conversations_split_at_rounds_keeping_the_last(tiny_tokenizer):
    tok = tiny_tokenizer
    long_answer = " ".join(["word"] * 40)
    msgs = conv("write the list", long_answer, "name a fruit", long_answer, "three words", "the end", system="sys")
    whole = len(encode_conversation(msgs, "alpaca", tok)[0])
    got = list(pieces(msgs, tok, "alpaca", whole - 1))
    assert len(got) == 2 and all(why is None for *_, why in got)
    assert got[-1][0][-1]["content"] == "the end"  # the final round is kept
    assert all(m[0]["role"] == "system" for m, *_ in got)  # every piece keeps the system message
    assert [m["content"] for m, *_ in got for m in m[1:]] == [m["content"] for m in msgs[1:]]
    # a round that alone overflows: cut, tokens counted; one whose prompt overflows: dropped
    one = list(pieces(conv("write the list", long_answer), tok, "alpaca", 60))
    (_, ids, mask, dropped, why), = one
    assert why == "truncated" and len(ids) == 60 and dropped > 0 and mask[-1] == 1
    (_, ids, _, dropped, why), = pieces(conv(" ".join(["the"] * 80), "x"), tok, "alpaca", 60)
    assert ids is None and why == "prompt_too_long" and dropped > 60


def test_tokenize_conversations_stats_and_ids(tiny_tokenizer):
    convs = [{"id": "s:1", "source": "s", "copy": 0, "messages": conv("write the list", "a b")},
             {"id": "s:1", "source": "s", "copy": 1, "messages": conv("write the list", "a b")},
             {"id": "s:2", "source": "s", "copy": 0, "messages": conv(*TURNS)}]
    by_split, stats = tokenize_conversations(convs, tiny_tokenizer, TokenizeParams(val_fraction=0.0))
    assert stats["conversations_in"] == 3 and stats["examples"] == 3 and stats["split_conversations"] == 0
    assert [t["id"] for t, _, _ in by_split["train"]] == ["s:1#0.0", "s:1#1.0", "s:2#0.0"]
