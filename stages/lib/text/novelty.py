"""Exact ROUGE-L novelty filtering (Alpaca / self-instruct semantics) without the O(N^2) loop.

The reference loop: each candidate, in order, is scored with ROUGE-L F1 against every
instruction in the pool (the seeds plus every earlier kept candidate) with `rouge_score`'s
default tokenizer (lowercase, `[a-z0-9]+` tokens, no stemming); it is rejected when the max is
above the threshold, otherwise it joins the pool. `novelty` returns the same decisions, the same
max score (bit for bit: the same float formula on the same integer LCS) and the same most
similar instruction, but computes an LCS only for pool items that can still reach the best:

* F1 = 2 L / (m + n) for token counts m, n and LCS length L, and L <= the multiset overlap o.
  Texts are indexed under occurrence features (token, k-th occurrence): o = shared features.
* Every text's features are sorted rarest first (document frequency over seeds + candidates).
  A candidate probes its features in that order. A pool item first met at probe step p shares
  none of the p earlier features, so o <= rem = (features left) and F1 <= 2 rem / (m + rem):
  once that is below the best, the search stops.
* Met through feature f, an item shares at most 1 + min(features of the candidate after f,
  features of the item after f) tokens (prefix filtering): posting lists are sorted by the
  latter, so a scan stops as soon as no later entry can reach the best.
* Items that pass get an exact LCS (bit-parallel, Hyyro 2004) in compiled code (numba).
Bounds are compared with a 1e-9 margin, so exact ties are always scored; ties in the float
score go to the earliest instruction (seeds first, then candidates in order), as `max` would.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numba
import numpy as np

EPS = 1e-9

_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")
# Scripts written without spaces between words: one token per character.
_NO_SPACE = (r"\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf"
             r"\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f")
_UNICODE_TOKEN = re.compile(rf"[{_NO_SPACE}]|(?:(?![{_NO_SPACE}])[^\W_])+")

TOKENIZERS = ("rouge_score", "unicode")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer: lowercase, `[a-z0-9]+` runs, no stemming."""
    return _ROUGE_TOKEN.findall(text.lower())


def unicode_tokens(text: str) -> list[str]:
    """NFKC + casefold; letter/digit runs in any script, one token per CJK/Thai/Khmer/... character."""
    return _UNICODE_TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def tokenizer(name: str) -> Callable[[str], list[str]]:
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}: use one of {TOKENIZERS}")
    return rouge_tokens if name == "rouge_score" else unicode_tokens


# ---------------------------------------------------------------- the index (numpy arrays)


@dataclass
class Encoded:
    """All texts as token ids, and an inverted index over their occurrence features."""

    tok_ptr: np.ndarray  # text i's tokens are toks[tok_ptr[i]:tok_ptr[i + 1]]
    toks: np.ndarray
    probe_ptr: np.ndarray  # text i's shareable features, rarest first: probe[probe_ptr[i]:...]
    probe: np.ndarray
    post_ptr: np.ndarray  # feature f's postings: post_*[post_ptr[f]:post_ptr[f + 1]], by `after` desc
    post_text: np.ndarray
    post_after: np.ndarray  # features of the text after f, in its rarest-first order
    vocab_size: int


def encode(texts: list[str], tokenize: str = "rouge_score") -> Encoded:
    tok = tokenizer(tokenize)
    vocab: dict[str, int] = {}
    feat_ids: dict[tuple[int, int], int] = {}
    lengths = np.zeros(len(texts), dtype=np.int64)
    all_toks: list[int] = []
    all_feats: list[int] = []
    for i, text in enumerate(texts):
        seen: Counter[int] = Counter()  # the k-th occurrence of a token in this text is feature (token, k)
        for w in tok(text):
            t = vocab.setdefault(w, len(vocab))
            seen[t] += 1
            k = seen[t]
            all_toks.append(t)
            all_feats.append(feat_ids.setdefault((t, k), len(feat_ids)))
            lengths[i] += 1
    toks = np.asarray(all_toks, dtype=np.int32)
    feats = np.asarray(all_feats, dtype=np.int64)
    tok_ptr = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=tok_ptr[1:])
    text_of = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
    df = np.bincount(feats, minlength=len(feat_ids))  # features are unique within a text
    # Each text's features rarest first (ties by feature id): `after` = features that follow.
    order = np.lexsort((feats, df[feats], text_of))
    pos = np.arange(len(feats)) - tok_ptr[text_of[order]]
    after = lengths[text_of[order]] - pos - 1
    sorted_feats, sorted_text = feats[order], text_of[order]
    shareable = df[sorted_feats] > 1
    probe = sorted_feats[shareable]
    probe_ptr = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.bincount(sorted_text[shareable], minlength=len(texts)), out=probe_ptr[1:])
    # Postings: by feature, then `after` descending, then text.
    porder = np.lexsort((sorted_text, -after, sorted_feats))
    post_ptr = np.zeros(len(feat_ids) + 1, dtype=np.int64)
    np.cumsum(df, out=post_ptr[1:])
    return Encoded(tok_ptr, toks, probe_ptr, probe, post_ptr, sorted_text[porder].astype(np.int64),
                   after[porder].astype(np.int64), len(vocab))


# ---------------------------------------------------------------- the search (compiled)


@numba.njit(cache=True, nogil=True)
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@numba.njit(cache=True, nogil=True)
def _lcs(row_of, pm, words, m, toks, start, end, v):
    """LCS length of the query (bit masks `pm` by row, rows looked up by token) and toks[start:end]."""
    ones = np.uint64(0xFFFFFFFFFFFFFFFF)
    for w in range(words):
        v[w] = ones
    for j in range(start, end):
        r = row_of[toks[j]]
        if r < 0:
            continue
        carry = np.uint64(0)
        for w in range(words):
            vw = v[w]
            u = vw & pm[r, w]
            s = vw + u
            c1 = np.uint64(1) if s < vw else np.uint64(0)
            s2 = s + carry
            c2 = np.uint64(1) if s2 < s else np.uint64(0)
            carry = c1 | c2
            v[w] = s2 | (vw & ~u)
    ones_left = 0
    for w in range(words):
        x = v[w]
        bits = m - 64 * w
        if bits < 64:
            x = x & ((np.uint64(1) << np.uint64(bits)) - np.uint64(1))
        ones_left += _popcount(x)
    return m - ones_left


@numba.njit(cache=True, nogil=True)
def _search(tok_ptr, toks, probe_ptr, probe, post_ptr, post_text, post_after, vocab_size,
            n_pool, threshold, score, nearest, kept):
    """Alpaca's loop: texts [0, n_pool) start the pool, later texts are candidates in order."""
    n_texts = len(tok_ptr) - 1
    active = np.zeros(n_texts, dtype=np.bool_)
    active[:n_pool] = True
    stamp = np.full(n_texts, -1, dtype=np.int64)
    row_of = np.full(vocab_size, -1, dtype=np.int64)
    max_m = 1
    for i in range(n_texts):
        max_m = max(max_m, tok_ptr[i + 1] - tok_ptr[i])
    words_max = (max_m + 63) // 64
    pm = np.zeros((max_m, words_max), dtype=np.uint64)
    v = np.zeros(words_max, dtype=np.uint64)
    scored = 0
    for t in range(n_pool, n_texts):
        m = tok_ptr[t + 1] - tok_ptr[t]
        words = (m + 63) // 64
        rows = 0
        for j in range(m):  # bit masks of the query's tokens
            tok = toks[tok_ptr[t] + j]
            if row_of[tok] < 0:
                row_of[tok] = rows
                for w in range(words):
                    pm[rows, w] = 0
                rows += 1
            pm[row_of[tok], j // 64] |= np.uint64(1) << np.uint64(j % 64)
        best, best_y = 0.0, -1
        big = probe_ptr[t + 1] - probe_ptr[t]
        for p in range(big):
            limit = best - EPS
            rem = big - p
            if 2.0 * rem / (m + rem) < limit:
                break
            rest = rem - 1
            f = probe[probe_ptr[t] + p]
            for e in range(post_ptr[f], post_ptr[f + 1]):
                y = post_text[e]
                after = post_after[e]
                share = 1 + min(rest, after)
                if 2.0 * share / (m + after + 1) < limit:  # the item has >= after + 1 tokens
                    if after <= rest:
                        break  # and so has every later entry (fewer features after f)
                    continue
                if y >= t or not active[y] or stamp[y] == t:
                    continue
                n = tok_ptr[y + 1] - tok_ptr[y]
                if 2.0 * min(share, n) / (m + n) < limit:
                    continue
                stamp[y] = t
                scored += 1
                lcs = _lcs(row_of, pm, words, m, toks, tok_ptr[y], tok_ptr[y + 1], v)
                if lcs == 0:
                    continue
                precision, recall = lcs / n, lcs / m  # rouge_score's float ops
                s = 2 * precision * recall / (precision + recall)
                if s > best or (s == best and y < best_y):
                    best, best_y = s, y
                    limit = best - EPS
        for j in range(m):
            row_of[toks[tok_ptr[t] + j]] = -1
        score[t - n_pool] = best
        nearest[t - n_pool] = best_y
        kept[t - n_pool] = best <= threshold
        if best <= threshold:
            active[t] = True
    return scored


@dataclass
class Novelty:
    kept: np.ndarray
    """Per candidate: max score <= threshold."""
    score: np.ndarray
    """Per candidate: max ROUGE-L F1 against the pool as it stood (0.0 when nothing shares a token)."""
    nearest: np.ndarray
    """Per candidate: index into pool + candidates of the earliest text with that score, or -1."""
    scored: int
    """Exact LCS computations made."""


def novelty(pool: list[str], candidates: list[str], threshold: float = 0.7, tokenize: str = "rouge_score") -> Novelty:
    """Alpaca's novelty loop over `candidates` in order, with `pool` (the seeds) to start."""
    enc = encode(list(pool) + list(candidates), tokenize)
    n = len(candidates)
    score, nearest, kept = np.zeros(n), np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.bool_)
    scored = _search(enc.tok_ptr, enc.toks, enc.probe_ptr, enc.probe, enc.post_ptr, enc.post_text, enc.post_after,
                     max(1, enc.vocab_size), len(pool), float(threshold), score, nearest, kept)
    return Novelty(kept, score, nearest, int(scored))


def novelty_decisions(seeds: Iterable[str], candidates: Iterable[str], threshold: float = 0.7,
                      tokenize: str = "rouge_score") -> Iterator[tuple[bool, float, str | None]]:
    """(kept, score, most similar text or None) for each candidate, in order."""
    seeds, candidates = list(seeds), list(candidates)
    res = novelty(seeds, candidates, threshold, tokenize)
    texts = seeds + candidates
    for k, s, j in zip(res.kept.tolist(), res.score.tolist(), res.nearest.tolist()):
        yield k, s, (texts[j] if j >= 0 else None)
