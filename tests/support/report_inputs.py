"""Inputs of a small report (tables, summary, kept and rejected rows) built through `build_tables`."""

from __future__ import annotations

from stages.report import ReportParams, build_tables


class _Tok:
    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


def report_inputs(nlp, judge=None, smoke=False):
    """(tables, summary, kept, rejected) of a small run: 4 kept, 2 rejected, one conversation, metrics."""
    texts = ["Write a poem about cats.", "Write a poem about dogs.", "Give me a recipe.", "What is love?"]
    kept = [{"id": f"k{i}", "instruction": t, "input": "some input" if i % 2 else "", "output": "an answer here",
             "rouge_max": [0.3, 0.55, 0.6, 0.69][i]} for i, t in enumerate(texts)]
    rejected = [{"id": "r0", "instruction": "Write a poem about cats!", "input": "", "output": "x", "rouge_max": 0.9,
                 "reason": "too_similar", "detail": "ROUGE-L 0.900 with k0"},
                {"id": "r1", "instruction": "Draw a map", "input": "", "output": "y", "rouge_max": None,
                 "reason": "blacklist", "detail": None}]
    convs = [{"messages": [{"role": "user", "content": "Write a poem about cats, please, with rhymes."},
                           {"role": "assistant", "content": "Cats are soft and they like to sleep all day long."}]}]
    metrics = {"filter": {"generated": 6, "unparsed": 0, "parsed": 6, "kept": 4, "rejected": 2, "rouge_threshold": 0.7,
                          "dropped_by_reason": {"blacklist": 1, "too_similar": 1}},
               "ingest": {"mixture": "distill", "sources": {"generated": {"read": 4, "clean": 3, "in_mixture": 3}}},
               "tokenize": {"tokens_dropped": 7, "split_conversations": 1},
               "generate": {"requests": 5, "cache_hits": 2, "teacher_calls": 3, "prompt_tokens_called": 100},
               "eval": {"val_loss": 1.5, **({"judge": judge} if judge else {}),
                        **({"judge_smoke_test_only": True} if smoke else {})}}
    train = {"loss": [(0, 2.0), (1, 1.5)], "padding_efficiency": [(0, 0.5), (1, 0.6)]}
    tables, summary = build_tables(ReportParams(), ["Write a poem about the sea."], kept, rejected, convs,
                                   [{"reason": "language", "detail": "de"}], metrics, train, nlp, _Tok())
    return tables, summary, kept, rejected
