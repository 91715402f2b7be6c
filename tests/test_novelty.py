"""Novelty filter: same decisions, scores and nearest instruction as Alpaca's rouge_score loop."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rapidfuzz.distance import LCSseq
from rouge_score import rouge_scorer, tokenize
from rouge_score.rouge_scorer import _score_lcs

from stages.lib.text.novelty import novelty, novelty_decisions, rouge_tokens, unicode_tokens
from tests.support.helpers import f1_from_lcs, rouge_l_f1
from tests.support.tiny import ROOT, shared


def brute_force(seeds, candidates, threshold=0.7, score=None):
    """Alpaca's loop: score against every pool item, reject when the max is > threshold."""
    score = score or (lambda a, b: _score_lcs(rouge_tokens(a), rouge_tokens(b)).fmeasure)
    pool, out = list(seeds), []
    for c in candidates:
        scores = [score(c, p) for p in pool]
        best = max(scores, default=0.0)
        out.append((best <= threshold, best, pool[scores.index(best)] if best > 0 else None))
        if best <= threshold:
            pool.append(c)
    return out


def real(name, path, field="instruction"):
    text = shared(name, path).read_text()
    recs = json.loads(text) if path.endswith(".json") else [json.loads(x) for x in text.splitlines()]
    return [r[field] for r in recs]


# ---------------------------------------------------------------- tokenizers and the score


def test_rouge_tokens_match_rouge_score_tokenizer():
    for text in ["Hello, World! It's 2023.", "naïve café ÜBER déjà-vu", "  ", "a_b c-d e.f 3.14", "Привет мир 你好"]:
        assert rouge_tokens(text) == tokenize.tokenize(text, None)


def test_unicode_tokens_cover_every_script():
    assert unicode_tokens("Переведи текст на английский") == ["переведи", "текст", "на", "английский"]
    assert unicode_tokens("把这句话翻译成英文。") == list("把这句话翻译成英文")
    assert unicode_tokens("Straße ﬁne Café_au-lait 3.14") == ["strasse", "fine", "café", "au", "lait", "3", "14"]
    assert unicode_tokens("日本語のテキスト and English") == [*"日本語のテキスト", "and", "english"]


def test_unicode_option_scores_non_latin_duplicates():
    seeds = ["把这句话翻译成英文。"]
    cands = ["请把这句话翻译成英文。", "写一首关于秋天的诗。"]
    assert [s for _, s, _ in novelty_decisions(seeds, cands)] == [0.0, 0.0]  # rouge_score sees no tokens
    (k1, s1, near), (k2, s2, _) = novelty_decisions(seeds, cands, tokenize="unicode")
    assert not k1 and s1 == pytest.approx(2 * 9 / 19) and near == seeds[0]
    assert k2 and s2 < 0.3


def test_rouge_l_equals_rouge_score_on_real_instructions():
    """Exact float equality with rouge_score on pairs of alpaca-libre generations and seeds."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    gen = real("alpaca-libre", "alpaca_libre_tasks_v1.jsonl")
    seeds = real("self-instruct", "seed_tasks.jsonl")
    rng = random.Random(0)
    pairs = [(rng.choice(gen), rng.choice(gen + seeds)) for _ in range(3000)]
    pairs += [(g, g.upper()) for g in gen[:50]] + [(g, "") for g in gen[:5]]
    for a, b in pairs:
        want = scorer.score(b, a)["rougeL"].fmeasure  # score(target, prediction)
        assert rouge_l_f1(rouge_tokens(a), rouge_tokens(b)) == want, (a, b)


# ---------------------------------------------------------------- decisions against the reference


def test_same_as_rouge_score_loop_on_real_generations():
    """Alpaca's loop with rouge_score itself, on the seeds and 450 real alpaca-libre generations."""
    seeds = real("self-instruct", "seed_tasks.jsonl")
    cands = real("alpaca-libre", "alpaca_libre_tasks_v1.jsonl")[:450]
    want = brute_force(seeds, cands)
    assert list(novelty_decisions(seeds, cands)) == want
    assert 50 < sum(not k for k, _, _ in want) < 400  # both outcomes occur


def test_same_as_brute_force_on_all_real_data():
    """All of alpaca-libre's raw generations, both Alpaca slices and the 252 user-oriented tasks
    (5,353 candidates in order, seeds first), against a brute-force loop over every pair with
    the rouge_score-exact F1 (float-equal to rouge_score: test above)."""
    seeds = real("self-instruct", "seed_tasks.jsonl")
    cands = (real("alpaca-libre", "alpaca_libre_tasks_v1.jsonl")
             + real("alpaca", "alpaca_data_first1727_flashmodels.json")
             + real("alpaca", "alpaca_gpt4_en_demo_llamafactory.json")
             + real("self-instruct", "user_oriented_instructions.jsonl"))
    vocab: dict[str, int] = {}
    enc = {t: "".join(chr(vocab.setdefault(w, len(vocab)) + 0xE000) for w in rouge_tokens(t)) for t in seeds + cands}

    def score(a, b):
        x, y = enc[a], enc[b]
        return f1_from_lcs(LCSseq.similarity(x, y), len(x), len(y))

    from rapidfuzz import process

    pool, want = list(seeds), []
    for c in cands:
        x = enc[c]
        lcs = process.cdist([x], [enc[p] for p in pool], scorer=LCSseq.similarity, workers=-1)[0].tolist()
        scores = [f1_from_lcs(L, len(x), len(enc[p])) for L, p in zip(lcs, pool)]
        best = max(scores, default=0.0)
        want.append((best <= 0.7, best, pool[scores.index(best)] if best > 0 else None))
        if best <= 0.7:
            pool.append(c)
    got = list(novelty_decisions(seeds, cands))
    assert len(got) == len(cands) > 5000
    assert got == want
    assert score(cands[0], cands[0]) == 1.0


words = st.lists(st.sampled_from("a b c d e f".split()), max_size=12).map(" ".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seeds=st.lists(words, max_size=5), cands=st.lists(words, max_size=25),
       threshold=st.sampled_from([0.7, 0.5, 2 / 3, 0.6, 0.75, 0.8, 1 / 3, 0.25, 1.0]))
def test_property_same_as_rouge_score_loop(seeds, cands, threshold):
    """Small alphabets make many shared tokens, repeats and exact ties at the threshold."""
    assert list(novelty_decisions(seeds, cands, threshold)) == brute_force(seeds, cands, threshold)


@settings(max_examples=60, deadline=None)
@given(seeds=st.lists(st.lists(st.sampled_from("abcdefgh"), min_size=50, max_size=200).map(" ".join), max_size=3),
       cands=st.lists(st.lists(st.sampled_from("abcdefgh"), min_size=0, max_size=200).map(" ".join), max_size=6),
       threshold=st.sampled_from([0.7, 0.9, 0.95]))
def test_property_long_texts_past_one_machine_word(seeds, cands, threshold):
    """Texts longer than 64 tokens take the multi-word bit-parallel LCS (with carries)."""
    assert list(novelty_decisions(seeds, cands, threshold)) == brute_force(seeds, cands, threshold)


def test_ties_at_the_threshold_are_kept():
    # 'a b c d' vs 'a b e f': LCS 2 of 4 and 4 -> F1 exactly 0.5, which is not > 0.5.
    (kept, score, near), = novelty_decisions(["a b c d"], ["a b e f"], threshold=0.5)
    assert score == 0.5 and kept and near == "a b c d"
    (kept, _, _), = novelty_decisions(["a b c d"], ["a b e f"], threshold=0.49)
    assert not kept


# Exact ties at Alpaca's 0.7: F1 = 2 L / (m + n) in real numbers, but rouge_score computes
# 2 p r / (p + r) in floats. (10, 10) tokens with LCS 7 give exactly 0.7 (kept: not > 0.7); (8, 12)
# and (9, 11) with LCS 7 give 0.7000000000000001 (rejected). The shared 7 tokens are spread out.
SEVEN = "describe the quiet harbor town at dawn".split()


def spread(extra: list[str], every: int) -> str:
    """SEVEN in order with the extra words inserted after every `every`-th shared token."""
    out, rest = [], list(extra)
    for k, w in enumerate(SEVEN, 1):
        out.append(w)
        if rest and k % every == 0:
            out.append(rest.pop(0))
    return " ".join(out + rest)


@pytest.mark.parametrize("seed_extra, cand_extra, want", [
    (["for", "young", "readers"], ["in", "three", "lines"], 0.7),                       # (10, 10)
    (["briefly"], ["in", "three", "short", "vivid", "plain"], 0.7000000000000001),       # (8, 12)
    (["in", "three", "short", "vivid", "plain"], ["briefly"], 0.7000000000000001),       # (12, 8)
    (["for", "young"], ["in", "three", "short", "lines"], 0.7000000000000001),           # (9, 11)
])
def test_exact_ties_at_0_7(seed_extra, cand_extra, want):
    seed, cand = spread(seed_extra, 2), spread(cand_extra, 3)
    assert len(rouge_tokens(seed)) + len(rouge_tokens(cand)) == 20
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert scorer.score(seed, cand)["rougeL"].fmeasure == want == scorer.score(cand, seed)["rougeL"].fmeasure
    assert rouge_l_f1(rouge_tokens(seed), rouge_tokens(cand)) == want
    kept = want <= 0.7
    assert list(novelty_decisions([seed], [cand], 0.7)) == [(kept, want, seed)]
    # kept at the tie, the candidate joins the pool and its copy is rejected against it at 1.0;
    # rejected, it does not, and the copy meets the seed alone again
    _, second = novelty_decisions([seed], [cand, cand.upper()], 0.7)
    assert second == ((False, 1.0, cand) if kept else (False, want, seed))


def test_ties_in_score_go_to_the_earliest_instruction():
    seeds = ["x b c", "a b c", "a b y"]
    (_, score, near), = novelty_decisions(seeds, ["a b z"])
    assert near == "a b c" and score == pytest.approx(2 / 3)  # 'a b c' and 'a b y' tie; seeds[0] scores 1/3


def test_edge_cases():
    assert list(novelty_decisions([], [])) == []
    assert list(novelty_decisions([], ["", "!!!", "a"])) == [(True, 0.0, None)] * 3
    assert list(novelty_decisions(["same words"], ["Same, words!"])) == [(False, 1.0, "same words")]
    res = novelty(["one two"], ["three four", "one two three"], 0.9)
    assert res.kept.tolist() == [True, True] and res.nearest.tolist() == [-1, 0]
    # "three four" shares one token with "one two three": F1 <= 2 * 1 / 5 < 0.8, so it is never scored
    assert res.score[1] == 0.8 and res.scored == 1


# ---------------------------------------------------------------- the command-line contract


def test_command_line_contract(tmp_path):
    seeds = real("self-instruct", "seed_tasks.jsonl")
    cands = real("alpaca-libre", "alpaca_libre_tasks_v1.jsonl")[:300]
    lines = (json.dumps({"instruction": s, "id": i}) + "\n" for i, s in enumerate(seeds))
    (tmp_path / "s.jsonl").write_text("".join(lines))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"instruction": c}) + "\n" for c in cands))
    out = tmp_path / "d.jsonl"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.novelty", "--seeds", str(tmp_path / "s.jsonl"),
                           "--candidates", str(tmp_path / "c.jsonl"), "--out", str(out), "--threshold", "0.6"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    float(proc.stdout.strip().splitlines()[-1])  # elapsed seconds last
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    want = brute_force(seeds, cands, 0.6)
    assert [(d["kept"], d["score"], d["most_similar"]) for d in lines] == want
    assert [d["index"] for d in lines] == list(range(len(cands)))

    (tmp_path / "bad.jsonl").write_text('{"instruction": "fine"}\n{"instr": "typo"}\n')
    proc = subprocess.run([sys.executable, "-m", "benchmarks.novelty", "--seeds", str(tmp_path / "s.jsonl"),
                           "--candidates", str(tmp_path / "bad.jsonl"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "bad.jsonl:2: instruction" in proc.stderr
