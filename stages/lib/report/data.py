"""Figure data of the `report` stage: pure functions from stage outputs to small tables.

Every table is a list of flat dicts (one row per bar, bin or point). The report draws its
figures from them and writes the same rows as CSV series under `metrics/report/`, so the
HTML page, `dvc plots show` and `dvc plots diff` show the same numbers.
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from stages.lib.text.rules import REASONS

RULE_REASONS = REASONS[: REASONS.index("too_similar")]
"""Filter reasons decided by the rules, in the order they apply."""
LENGTH_FIELDS = ("instruction", "input", "output")
"""Fields of the length histograms (one series file each)."""


# ---------------------------------------------------------------- verb-noun structure


PLAIN_LABEL = re.compile(r"[\w'-]{1,40}")
"""What a label written from teacher or corpus text may hold: DVC's plot page embeds the CSV values
inside `<script>` without escaping `</`, so anything else (markup, `$`, spaces) becomes `other`."""


def plain_label(text: str) -> str:
    """`text` when it is a plain word (`PLAIN_LABEL`), else "other"."""
    return text if PLAIN_LABEL.fullmatch(text) else "other"


def verb_noun(doc) -> tuple[str, str] | None:
    """(root verb, its direct-object noun), lowercased lemmas, from a parsed spaCy `doc`.

    As self-instruct's Figure 2: the first sentence whose root is a verb decides; the pair
    is its first direct object that is a noun. None when there is no such structure. A lemma
    that is not a plain word is "other" (`plain_label`): these become plot labels.
    """
    for sent in doc.sents:
        root = sent.root
        if root.pos_ != "VERB":
            continue
        obj = next((t for t in root.children if t.dep_ == "dobj" and t.pos_ in ("NOUN", "PROPN")), None)
        return (plain_label(root.lemma_.lower()), plain_label(obj.lemma_.lower())) if obj is not None else None
    return None


def load_parser(name: str):
    """The installed spaCy pipeline `name` (tagger, parser, lemmatizer; no NER)."""
    import spacy

    return spacy.load(name, exclude=["ner"])


def verb_noun_pairs(texts: Iterable[str], nlp, batch_size: int = 256) -> list[tuple[str, str] | None]:
    return [verb_noun(doc) for doc in nlp.pipe(texts, batch_size=batch_size)]


def verb_noun_table(pairs: Iterable[tuple[str, str] | None], top_verbs: int, top_nouns: int) -> list[dict]:
    """The `top_verbs` commonest verbs (by pairs), each with its `top_nouns` commonest nouns.

    Rows: verb, noun, count, verb_count (all pairs of that verb), label ("verb noun").
    Ties go alphabetically, so the table does not depend on input order.
    """
    counts = Counter(p for p in pairs if p is not None)
    verbs = Counter()
    for (v, _), c in counts.items():
        verbs[v] += c
    rows = []
    for v, vc in sorted(verbs.items(), key=lambda kv: (-kv[1], kv[0]))[:top_verbs]:
        nouns = sorted(((n, c) for (vv, n), c in counts.items() if vv == v), key=lambda nc: (-nc[1], nc[0]))
        rows += [{"verb": v, "noun": n, "count": c, "verb_count": vc, "label": f"{v} {n}"}
                 for n, c in nouns[:top_nouns]]
    return rows


# ---------------------------------------------------------------- histograms


def histogram(values: Iterable[float] | None, edges: np.ndarray, closed: str = "left",
              **columns: Iterable[float]) -> list[dict]:
    """Counts per bin of `values` (column `count`) and of each named series; values outside the edges are not counted.

    closed="left": bins [a, b) with the last one closed (numpy's rule); closed="right": bins (a, b]
    with the first one closed, so a score equal to a threshold edge counts on the kept side.
    """
    series = {"count": values} if values is not None else {}
    series.update(columns)
    edges = np.asarray(edges, dtype=float)
    counts = {}
    for k, v in series.items():
        v = np.asarray(list(v), dtype=float)
        v = v[(v >= edges[0]) & (v <= edges[-1])]
        idx = np.searchsorted(edges, v, side="right" if closed == "left" else "left") - 1
        counts[k] = np.bincount(np.clip(idx, 0, len(edges) - 2), minlength=len(edges) - 1)
    return [{"bin_start": round(float(edges[i]), 6), "bin_end": round(float(edges[i + 1]), 6),
             **{k: int(c[i]) for k, c in counts.items()}} for i in range(len(edges) - 1)]


def rouge_vs_seeds(seeds: list[str], instructions: list[str], tokenize: str = "rouge_score") -> np.ndarray:
    """Each instruction's max ROUGE-L F1 against the seeds only (the filter's pool also holds earlier kept ones)."""
    from stages.lib.text.novelty import novelty

    # threshold -1 keeps no candidate, so the pool stays the seeds: exact scores, no O(N*S) loop
    return novelty(seeds, instructions, threshold=-1.0, tokenize=tokenize).score


def threshold_edges(threshold: float, window: float, bins: int) -> np.ndarray:
    """Bins of equal width over threshold +- window (within [0, 1]); the threshold is an edge."""
    half = max(1, bins // 2)
    edges = np.round(threshold + (window / half) * np.arange(-half, half + 1), 10)
    return edges[(edges >= -1e-9) & (edges <= 1 + 1e-9)]


def length_edges(lengths: np.ndarray, bins: int) -> np.ndarray:
    """At most `bins` integer-width bins from 0 past the longest text."""
    top = int(lengths.max()) if len(lengths) else 1
    step = max(1, math.ceil((top + 1) / bins))
    return np.arange(0, top + step + 1, step, dtype=float)


def token_lengths(rows: list[dict], tok, fields=LENGTH_FIELDS) -> dict[str, np.ndarray]:
    """Tokens of the student tokenizer (no special tokens) per field; empty inputs count 0."""
    out = {}
    for f in fields:
        texts = [r.get(f) or "" for r in rows]
        ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        out[f] = np.array([len(x) for x in ids], dtype=np.int64)
    return out


# ---------------------------------------------------------------- counts from metrics


def funnel(filter_m: dict) -> list[dict]:
    """Rows left after each step: generated, parsed, each rule, novelty, near duplicates, kept."""
    by = filter_m.get("dropped_by_reason", {})
    left = filter_m["generated"]
    rows = [{"step": "generated", "left": left, "dropped": 0}]
    steps = [("parsed", filter_m["generated"] - filter_m["parsed"])]
    steps += [(f"rule: {r}", by.get(r, 0)) for r in RULE_REASONS]
    steps += [("novelty (ROUGE-L)", by.get("too_similar", 0)),
              ("near duplicate (MinHash)", by.get("near_duplicate", 0))]
    for name, dropped in steps:
        left -= dropped
        rows.append({"step": name, "left": left, "dropped": dropped})
    if left != filter_m["kept"]:
        raise ValueError(f"funnel: {left} rows left after every step, but filter kept {filter_m['kept']}")
    rows.append({"step": "kept", "left": left, "dropped": 0})
    return rows


def spend(generate_m: dict) -> list[dict]:
    """Teacher requests (cache hits, calls, failures) and tokens paid for."""
    g = generate_m
    return [{"item": "requests", "value": g.get("requests", 0)},
            {"item": "cache hits", "value": g.get("cache_hits", 0)},
            {"item": "teacher calls", "value": g.get("teacher_calls", 0)},
            {"item": "failed", "value": g.get("failed", 0)},
            {"item": "prompt tokens", "value": g.get("prompt_tokens_called", 0)},
            {"item": "completion tokens", "value": g.get("completion_tokens_called", 0)},
            {"item": "cost (USD)", "value": g.get("cost_usd_called", 0.0)}]


def selection(select_m: dict) -> list[dict]:
    """Kept and rejected rows per bin of the score the select policy used (empty: no selection)."""
    d = (select_m.get("scores") or {}).get(select_m.get("score") or "")
    if not d:
        return []
    e = d["edges"]
    return [{"bin_start": e[i], "bin_end": e[i + 1], "kept": d["kept"][i], "rejected": d["rejected"][i]}
            for i in range(len(e) - 1)]


def ingest_sources(ingest_m: dict) -> list[dict]:
    """Per source of the mixture: rows read, clean, in the mixture (after caps and weights)."""
    return [{"source": name, "read": s.get("read", 0), "clean": s.get("clean", 0), "in_mixture": s.get("in_mixture", 0),
             "weight": s.get("weight", 1.0)} for name, s in sorted(ingest_m.get("sources", {}).items())]


def languages(kept_langs: Iterable[str], dropped_langs: Iterable[str]) -> list[dict]:
    """Conversations per language: kept (language ID of the whole text) and dropped by the language filter."""
    kept, dropped = Counter(kept_langs), Counter(dropped_langs)
    total = sum(kept.values()) + sum(dropped.values())
    return [{"language": lang, "kept": kept[lang], "dropped": dropped[lang],
             "share": round((kept[lang] + dropped[lang]) / total, 4)}
            for lang in sorted(set(kept) | set(dropped), key=lambda x: (-(kept[x] + dropped[x]), x))]


def language_of(messages: list[dict]) -> str:
    """py3langid's language of a conversation's text (code blocks removed)."""
    import py3langid

    text = re.sub(r"```.*?```", " ", " ".join(m["content"] for m in messages), flags=re.S)
    return py3langid.classify(text)[0] if text.strip() else "none"


def splitting(tokenize_m: dict) -> list[dict]:
    """What the tokenizer's length limit cost: conversations split or truncated, examples and tokens dropped."""
    return [{"item": k.replace("_", " "), "value": tokenize_m.get(k, 0)}
            for k in ("conversations_in", "examples", "split_conversations", "truncated", "prompt_too_long",
                      "tokens_dropped")]


JUDGE_EXTRA = ("wins", "losses", "draws", "stop_rate", "position_flip_rate", "longer_wins_rate")
"""Per-set judge counts and bias diagnostics carried into the series as they are."""


def judge(eval_m: dict, z: float = 1.96) -> list[dict]:
    """Win rate per eval set with its normal interval (win_rate +- z * standard_error, clipped to 0-100)."""
    rows = []
    for name, j in sorted((eval_m.get("judge") or {}).items()):
        if not isinstance(j, dict) or j.get("win_rate") is None or not math.isfinite(j["win_rate"]):
            continue  # no set, or no judged prompt (n = 0: NaN)
        wr, se = float(j["win_rate"]), float(j.get("standard_error") or 0.0)
        rows.append({"eval_set": name, "win_rate": round(wr, 4), "standard_error": round(se, 4),
                     "low": round(max(0.0, wr - z * se), 4), "high": round(min(100.0, wr + z * se), 4),
                     "n": int(j.get("n", 0)), **{k: j.get(k) for k in JUDGE_EXTRA}})
    return rows


def dvclive_series(plots_dir: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Every dvclive `*.tsv` (step, value) under `plots_dir`, by metric name; {} when there is none."""
    out = {}
    for path in sorted(Path(plots_dir).glob("**/*.tsv")):
        out[path.stem] = parse_tsv(path.read_text(encoding="utf-8"))
    return out


def parse_tsv(text: str) -> list[tuple[float, float]]:
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    return [(float(r[0]), float(r[1])) for r in rows[1:] if len(r) >= 2 and r[1] not in ("", "nan")]


def loss_series(series: dict[str, list]) -> dict[str, list]:
    """Train and validation loss curves among dvclive series: `loss`/`train_loss` and any `*val*loss*`."""
    out = {}
    for name, pts in series.items():
        n = name.lower()
        if "loss" not in n:
            continue
        out["validation" if ("val" in n or "eval" in n) else "train"] = pts
    return out


# ---------------------------------------------------------------- sample tables


def sample_rows(rows: list[dict], n: int, seed: int, columns: list[str]) -> list[dict]:
    """`n` rows drawn without replacement with Random(seed), in their original order."""
    idx = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [{c: rows[i].get(c) for c in columns} for i in idx]
