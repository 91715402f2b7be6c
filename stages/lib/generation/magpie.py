"""Magpie (Xu et al. 2024, arXiv 2406.08464): an aligned teacher writes the user's query itself.

The teacher is given only the opening of a user turn in its own chat template (the pre-query
template) and samples until its end-of-turn token: that text is a user query. The query is then
answered with the normal chat template. No seed task and no list parsing.

The pre-query template is derived from the teacher's chat template, never hard-coded: the
template renders the conversation so far plus a sentinel user message, and the text before the
sentinel is the pre-query (for SmolLM2 that includes its default system prompt; for Llama 3,
`<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n`). The first token of what
follows the sentinel is the end-of-turn marker (`<|im_end|>`, `<|eot_id|>`), used as a stop.
Multi-turn (`turns` > 1) renders the whole conversation so far the same way for the next query.

This needs a raw prompt stillhouse controls: the local backend or a completion endpoint (vLLM,
llama.cpp server) with the teacher's tokenizer (`tokenizer`). A chat-only endpoint adds its own
template around every message, so `prompt_form: chat` stops with an error before any call.

Query filters, each drop with its reason: `empty_query`, `truncated_query` (no end of turn within
the budget), `repeated_query` (the same normalised query as an earlier one), `repetitive_query`
(a word 3-gram repeated `max_ngram_repeats` times or more), `non_english_query` (py3langid, when
the query has at least `min_language_chars` letters); answers: `empty_answer`, `answer_truncated`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

import polars as pl

from stages.lib.errors import StageError, check
from stages.lib.generation.method import Generated, Inputs
from stages.lib.llm.types import Sampling, provenance
from stages.lib.stats import DROPPED, Stats, drop_row

SENTINEL = "STILLHOUSEMAGPIESENTINEL"
EXTRA_COLUMNS = {"magpie_turns": pl.Int64, "messages_json": pl.String}
"""Columns the magpie method adds: turns in the conversation and the whole conversation as JSON."""


@dataclass
class MagpieParams:
    tokenizer: str | None = None
    """Where the teacher's chat template comes from: null means `generate.teacher.model` (the local model dir);
    a completion endpoint needs its model's tokenizer here (a local dir or a hub id)."""
    turns: int = 1
    """User turns per conversation (1: single-turn; more: the teacher continues the conversation)."""
    query_temperature: float = 1.0
    """Sampling temperature of the query (Magpie: 1.0)."""
    query_top_p: float = 1.0
    """Nucleus sampling of the query (Magpie: 1.0)."""
    query_max_new_tokens: int = 96
    """Length budget of a query; a query without its end of turn within it is dropped as truncated."""
    answer_max_new_tokens: int = 192
    """Length budget of an answer."""
    language: str = "en"
    """Queries must be in this language (py3langid); empty: any language."""
    min_language_chars: int = 20
    """Queries with fewer letters are not language-checked (too short to tell)."""
    max_ngram_repeats: int = 3
    """A query repeating one word 3-gram this many times is dropped as repetitive (0: off)."""

    def __post_init__(self):
        check(self.turns >= 1, "magpie.turns: must be >= 1")
        check(self.query_temperature >= 0 and 0 < self.query_top_p <= 1, "magpie: temperature >= 0, 0 < top_p <= 1")
        check(self.query_max_new_tokens >= 1 and self.answer_max_new_tokens >= 1, "magpie: max_new_tokens >= 1")
        check(self.min_language_chars >= 0 and self.max_ngram_repeats >= 0, "magpie: counts must be >= 0")


# ---------------------------------------------------------------- templates


def pre_query_template(tok, history: list[dict] | None = None) -> tuple[str, str]:
    """(the text up to where the next user message begins, the end-of-turn marker after a user message),
    both from the tokenizer's chat template."""
    if not getattr(tok, "chat_template", None):
        raise StageError("magpie: the teacher's tokenizer has no chat template (set generate.magpie.tokenizer)")
    text = tok.apply_chat_template([*(history or []), {"role": "user", "content": SENTINEL}], tokenize=False,
                                   add_generation_prompt=False)
    if text.count(SENTINEL) != 1:
        raise StageError("magpie: the chat template does not render a user message verbatim; cannot derive "
                         "its pre-query template")
    pre, post = text.split(SENTINEL)
    end = post.strip().split()[0] if post.strip() else tok.eos_token
    return pre, end


def load_tokenizer(name: str):
    """The teacher's tokenizer (its chat template), or a StageError naming the param to set."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise StageError(f"magpie: cannot load the teacher's tokenizer from {name!r} ({e}); set "
                         "generate.magpie.tokenizer to its local dir or hub id") from None


def raw_prompt(tok, text: str) -> str:
    """`text` as a completion prompt: without a leading BOS when the tokenizer adds one itself."""
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok("", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]:
        return text[len(bos):]
    return text


def answer_template(tok, history: list[dict]) -> tuple[str, str]:
    """(the normal chat template's generation prompt after `history`, the assistant's end-of-turn marker)."""
    text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([*history, {"role": "assistant", "content": SENTINEL}], tokenize=False)
    post = full.split(SENTINEL, 1)[1] if SENTINEL in full else ""
    return text, (post.strip().split()[0] if post.strip() else tok.eos_token)


# ---------------------------------------------------------------- filters


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def query_reason(query: str, finish_reason: str, seen: set[str], m: MagpieParams, lang_of=None) -> str | None:
    """Why a sampled query is dropped, or None; adds a kept query's normal form to `seen`."""
    if not query.strip():
        return "empty_query"
    if finish_reason == "length":
        return "truncated_query"
    norm = _norm(query)
    if norm in seen:
        return "repeated_query"
    words = norm.split()
    if m.max_ngram_repeats:
        grams = Counter(tuple(words[i : i + 3]) for i in range(len(words) - 2))
        if grams and max(grams.values()) >= m.max_ngram_repeats:
            return "repetitive_query"
    if m.language and sum(c.isalpha() for c in query) >= m.min_language_chars:
        lang = (lang_of or language_of)(query)
        if lang != m.language:
            return "non_english_query" if m.language == "en" else f"language_{lang}"
    seen.add(norm)
    return None


def language_of(text: str) -> str:
    import py3langid

    return py3langid.classify(text)[0]


# ---------------------------------------------------------------- the driver


def check_endpoint(backend: str, prompt_form: str) -> None:
    """Stop before any call when the teacher's raw prompt is not ours to write."""
    if prompt_form == "chat":
        raise StageError("generate.method magpie: needs a raw prompt (the teacher's chat template opened at a user "
                         "turn), which a chat-only endpoint does not take; use the local backend or a completion "
                         "endpoint (vLLM, llama.cpp server) with prompt_form: completion and magpie.tokenizer set")
    if backend not in ("local", "openai"):
        raise StageError(f"generate.method magpie: unknown backend {backend!r}")


def run(client, inputs: Inputs, m: MagpieParams) -> Generated:
    """The method's contract (`stages.lib.generation.method`): `num_requests` conversations, the queries
    written from the template of `m.tokenizer` (default: the teacher's own)."""
    tok = load_tokenizer(m.tokenizer or inputs.teacher_model)
    tasks, drops, metrics = converse(client.ask, tok, inputs.num_requests, m, inputs.sampling)
    return Generated(tasks, drops, {"magpie": metrics})


def converse(ask, tok, n: int, m: MagpieParams, sampling: Sampling):
    """`n` conversations of `m.turns` user turns. `ask(prompts, sampling, form)` in completion form.
    Returns (task rows, drop rows, metrics)."""

    convs = [[] for _ in range(n)]
    alive = list(range(n))
    seen: set[str] = set()
    drops, turns_done = [], [0] * n
    last: dict[int, dict] = {}
    for turn in range(1, m.turns + 1):
        pres = [pre_query_template(tok, convs[i]) for i in alive]
        q_recs = ask([raw_prompt(tok, p) for p, _ in pres],
                     Sampling(m.query_max_new_tokens, m.query_temperature, m.query_top_p,
                              tuple(sorted({e for _, e in pres})), sampling.seed), "completion")
        answering = []
        for i, (_, end), rec in zip(alive, pres, q_recs):
            if rec is None:
                continue
            query = rec["text"].split(end)[0].strip()
            why = query_reason(query, rec["finish_reason"], seen, m)
            if why:
                drops.append(drop_row(f"magpie_query_{turn}", why, rec["text"], request_index=i, item_index=turn - 1,
                                      **provenance(rec)))
            else:
                answering.append((i, query))
        prompts = [answer_template(tok, [*convs[i], {"role": "user", "content": q}]) for i, q in answering]
        a_recs = ask([raw_prompt(tok, p) for p, _ in prompts],
                     Sampling(m.answer_max_new_tokens, sampling.temperature, sampling.top_p,
                              tuple(sorted({e for _, e in prompts})), sampling.seed), "completion")
        nxt = []
        for (i, q), (_, end), rec in zip(answering, prompts, a_recs):
            if rec is None:
                continue
            answer = rec["text"].split(end)[0].strip()
            why = "empty_answer" if not answer else "answer_truncated" if rec["finish_reason"] == "length" else None
            if why:
                drops.append(drop_row(f"magpie_answer_{turn}", why, rec["text"], request_index=i, item_index=turn - 1,
                                      **provenance(rec)))
                continue
            convs[i] += [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
            turns_done[i], last[i] = turn, rec
            nxt.append(i)
        alive = nxt
    tasks = []
    for i in range(n):
        if not turns_done[i]:
            continue
        c = convs[i]
        tasks.append({"id": f"magpie-{i:06d}", "request_index": i, "item_index": 0, **provenance(last[i]),
                      "instruction": c[0]["content"], "input": "", "output": c[1]["content"], "in_context_ids": [],
                      "is_classification": None, "source": "magpie", "magpie_turns": turns_done[i],
                      "messages_json": json.dumps(c, ensure_ascii=False)})
    metrics = {"conversations": n, "kept": len(tasks), "turns": Stats.tally(t["magpie_turns"] for t in tasks),
               DROPPED: Stats.of_drops(d["reason"] for d in drops).dropped_by_reason()}
    return tasks, drops, metrics
