"""Stage `ingest`: external teacher conversations and generated tasks -> one conversation schema.

Koala trained on ChatGPT dialogues users shared (ShareGPT) and on HC3; FastChat cleaned ShareGPT
with scripts. Here every source becomes rows of `{id, source, original_id, licence, origin,
messages: [{role: system|user|assistant, content}]}`, then goes through cleaning steps, each
counted with its reason (datatrove style: pure steps, stats and drop reasons):

1. read: ShareGPT JSON/JSONL, Alpaca JSON/JSONL, HC3 JSONL (`answers: chatgpt` or `human`),
   OpenAI-messages JSONL, and this pipeline's filtered tasks (`format: generated`); a malformed
   record is reported with source, file and position and never stops the others; text from the
   wild is repaired (invalid UTF-8, lone surrogates, NULs: `text_repaired`) and a record with a
   message over `max_message_chars` is dropped as `too_long`;
2. clean text: HTML to markdown, "Copy code" artefacts, regenerate counters;
3. roles: a leading system message is kept, leading assistant messages and a trailing user
   message are dropped, consecutive same-role messages are merged, an empty message ends the
   conversation;
4. repeated ids, ChatGPT's "Too many requests" replies and conversations naming the teacher or
   its vendor are dropped;
5. language ID per message (py3langid) against `languages`;
6. exact dedupe on (first user message, first assistant message), then MinHash-LSH;
7. decontamination: word n-gram overlap of user messages with declared eval prompt sets;
8. caps per source, then the named mixture's weights.

The stage streams: a JSON Lines source is read line by line and a JSON array item by item
(`stages.lib.formats.records`), each conversation goes through the steps as it is read, and rows
and drops go to parquet shards as each fills (`ShardWriter`). Memory holds one shard of rows and,
per conversation seen, its id, a 16-byte digest of its first exchange and its MinHash bands, not
the corpus (`benchmarks/ingest_memory.py`). A source that holds no records is warned about.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

from stages.lib import paths
from stages.lib.errors import StageError, check
from stages.lib.formats import Malformed, records, to_messages
from stages.lib.io import ShardWriter, atomic_dir, read_shards, write_json
from stages.lib.params import convert_fields, load_params, run_main
from stages.lib.progress import log
from stages.lib.stats import DROPPED, Stats, drop_row
from stages.lib.text.clean import MAX_TEXT_CHARS
from stages.lib.text.dedup import NearDuplicates, word_shingles

FORMATS = ("sharegpt", "alpaca", "hc3", "messages", "generated")
BLOCKED = "Too many requests in 1 hour. Try again later."
TEACHER_NAMES = ["openai", "chatgpt", "gpt-3", "gpt3", "gpt-4", "gpt4", "chat-gpt", "open-ai", "open ai", "chadgpt"]


@dataclass
class SourceParams:
    """One source of conversations (`ingest.sources.<name>`)."""

    format: Literal["sharegpt", "alpaca", "hc3", "messages", "generated"]
    """sharegpt (JSON/JSONL) | alpaca (JSON/JSONL) | hc3 (JSONL) | messages (OpenAI JSONL) | generated
    (data/filtered)."""
    path: str | None = None
    """The file (required for every format but `generated`)."""
    licence: str = "unknown"
    """Licence recorded on each row."""
    cap: int = 0
    """Keep at most this many clean conversations of the source (0: all)."""
    answers: Literal["chatgpt", "human"] | None = None
    """hc3: which answers become the assistant turn."""

    def __post_init__(self):
        check(self.format == "generated" or bool(self.path), "path: required")
        check(self.format != "hc3" or self.answers in ("chatgpt", "human"), "answers: chatgpt or human (hc3)")
        check(self.cap >= 0, "cap: must be >= 0")


@dataclass
class IngestParams:
    sources: dict[str, SourceParams] = field(
        default_factory=lambda: {"generated": SourceParams(format="generated", licence="teacher-terms")})
    """name -> {format, path, licence, cap (0: all), answers (hc3: chatgpt | human)}."""
    mixtures: dict[str, dict[str, float]] = field(default_factory=lambda: {"distill": {"generated": 1.0}})
    """name -> {source: weight}; weight < 1 keeps that share (seeded by id), 2 repeats twice."""
    mixture: str = "distill"
    """The mixture to build."""
    languages: list[str] = field(default_factory=lambda: ["en"])
    """Keep conversations whose messages are all in these languages (ISO 639-1); empty: keep all."""
    min_language_chars: int = 20
    """Messages shorter than this are not language-checked (too short to identify)."""
    teacher_names: list[str] = field(default_factory=lambda: list(TEACHER_NAMES))
    """Drop conversations mentioning any of these (case-insensitive)."""
    minhash_threshold: float = 0.9
    """Near-duplicate conversations above this estimated Jaccard are dropped (0 disables)."""
    minhash_num_perm: int = 128
    """MinHash permutations."""
    minhash_ngram: int = 5
    """Word n-gram shingles."""
    minhash_seed: int = 1
    """Seed of the MinHash permutations."""
    decontaminate: list[str] = field(default_factory=lambda: ["seeds/eval/eval_prompts.jsonl",
                                                              "seeds/eval/ifeval_subset.jsonl"])
    """Eval prompt files (JSON/JSONL with instruction/prompt/question/text) whose n-grams training prompts must
    not share."""
    decontam_ngram: int = 8
    """Word n-gram length for decontamination (a shorter eval prompt must not appear whole)."""
    seed: int = 0
    """Seeds mixture sampling."""
    rows_per_shard: int = 50_000
    """Rows per parquet shard."""
    max_message_chars: int = MAX_TEXT_CHARS
    """A record holding a message longer than this (characters) is dropped as `too_long` (0: no cap)."""

    def __post_init__(self):
        convert_fields(self, "ingest")
        check(self.max_message_chars >= 0, "max_message_chars: must be >= 0 (0: no cap)")
        check(self.mixture in self.mixtures, f"mixture: {self.mixture!r} is not in mixtures {sorted(self.mixtures)}")
        for mix, weights in self.mixtures.items():
            for s, w in weights.items():
                check(s in self.sources, f"mixtures.{mix}: unknown source {s!r}")
                check(w >= 0, f"mixtures.{mix}.{s}: weight must be >= 0")
        check(0 <= self.minhash_threshold <= 1 and self.decontam_ngram >= 1,
              "minhash_threshold in [0, 1], decontam_ngram >= 1")


# ---------------------------------------------------------------- 1. read


def iter_source(name: str, src: SourceParams, generated: list[dict] | None = None, max_chars: int = MAX_TEXT_CHARS,
                stats: dict | None = None):
    """(conversation, None) or (None, malformed report) of one source, in file order, streamed from the file
    (`stages.lib.formats.records`): text is repaired and records with a message over `max_chars` are reported as
    `too_long`; `stats` counts both."""
    fmt, licence = src.format, src.licence
    if fmt == "generated":
        items, where = ((f"[{i}]", r) for i, r in enumerate(generated or [])), paths.SELECTED
        # a multi-turn generated row (magpie turns > 1) carries its whole conversation
        items = ((pos, {**r, "messages": json.loads(r["messages_json"])} if r.get("messages_json") else r)
                 for pos, r in items)
    else:
        path = Path(src.path)
        if not path.is_file():
            raise StageError(f"sources.{name}.path: {path} not found")
        items, where = records(path, max_chars, stats), str(path)
    for pos, rec in items:
        try:
            kind = "messages" if fmt == "generated" and isinstance(rec, dict) and "messages" in rec else fmt
            convs = to_messages(rec, kind, src.answers)
        except Malformed as e:
            yield None, {"source": name, "origin": f"{where}{pos}", "reason": str(e), "kind": e.reason}
            continue
        for k, (oid, msgs) in enumerate(convs):
            oid = str(oid) if oid is not None else f"{pos}-{k}"
            yield {"id": f"{name}:{oid}", "source": name, "original_id": oid, "licence": licence,
                   "origin": f"{where}{pos}", "messages": msgs}, None


def read_source(name: str, src: SourceParams, generated: list[dict] | None = None, max_chars: int = MAX_TEXT_CHARS,
                stats: dict | None = None) -> tuple[list[dict], list[dict]]:
    """`iter_source` collected: (conversations, malformed reports)."""
    convs, bad = [], []
    for conv, report in iter_source(name, src, generated, max_chars, stats):
        (convs.append(conv) if conv is not None else bad.append(report))
    return convs, bad


# ---------------------------------------------------------------- 2-4. text, roles, teacher names

COPY_CODE = re.compile(r"```\s*+(\w*?)\s*+Copy code\s*")
"""FastChat's "Copy code" after a fence. The whitespace runs are possessive, so the match is linear: the old
pattern, with plain ones, retried every split of a long whitespace run (about 40 s for 200,000 characters)."""
_HTML = re.compile(r"<(div|p|span|pre|code|ol|ul|li|br|h[1-6]|table|tr|td|strong|em|b|i|a)\b[^>]*>", re.I)


def clean_text(text: str) -> str:
    """HTML to markdown, then FastChat's artefact fixes ("Copy code", regenerate counters)."""
    if _HTML.search(text):
        from markdownify import markdownify

        text = markdownify(text, heading_style="ATX", code_language="")
    text = re.sub(r"^\s*\d+\s*/\s*\d+\s*\n", "", text)  # regenerate counter "2 / 2"
    text = re.sub(r"Copy\d+ chars / \d+ words", "", text)
    text = COPY_CODE.sub(lambda m: f"```{m.group(1)}\n", text)
    text = text.replace("\nCopy code\n", "\n\n")
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def fix_roles(msgs: list[dict]) -> tuple[list[dict] | None, str | None, bool]:
    """(messages, drop reason, repaired). Alternation user/assistant after an optional system message."""
    out: list[dict] = []
    repaired = False
    for m in msgs:
        if not m["content"].strip():
            repaired = True
            break  # an empty message ends the conversation (FastChat)
        if m["role"] == "system" and out:
            repaired = True
            m = {"role": "user", "content": m["content"]}
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
            repaired = True
        else:
            out.append(dict(m))
    start = 1 if out and out[0]["role"] == "system" else 0
    while len(out) > start and out[start]["role"] != "user":
        del out[start]
        repaired = True
    while out and out[-1]["role"] != "assistant":
        out.pop()
        repaired = True
    if sum(m["role"] == "assistant" for m in out) == 0:
        return None, "no_assistant_turn", repaired
    return out, None, repaired


def names_teacher(msgs: list[dict], names: list[str]) -> str | None:
    if not names:
        return None
    pat = re.compile(r"(?<![\w-])(" + "|".join(re.escape(n) for n in names) + r")(?![\w-])", re.I)
    for m in msgs:
        hit = pat.search(m["content"])
        if hit:
            return hit.group(1).lower()
    return None


# ---------------------------------------------------------------- 5. language


def language_reason(msgs: list[dict], languages: list[str], min_chars: int) -> str | None:
    """`language:xx` for the first message identified as a language outside `languages`."""
    if not languages:
        return None
    import py3langid

    for m in msgs:
        text = re.sub(r"```.*?```", " ", m["content"], flags=re.S)  # code is no language
        if len(text.strip()) < min_chars:
            continue
        lang, _ = py3langid.classify(text)
        if lang not in languages:
            return f"language:{lang}"
    return None


# ---------------------------------------------------------------- 6. duplicates

def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def first_pair(msgs: list[dict]) -> tuple[str, str]:
    user = next((m["content"] for m in msgs if m["role"] == "user"), "")
    bot = next((m["content"] for m in msgs if m["role"] == "assistant"), "")
    return _norm(user), _norm(bot)


# ---------------------------------------------------------------- 7. decontamination


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class Decontaminator:
    """Flags text sharing a word n-gram with an eval prompt (or containing a whole short eval prompt)."""

    def __init__(self, eval_sets: dict[str, list[str]], n: int):
        self.n = n
        self.index: dict[tuple[str, ...], str] = {}
        self.short: dict[str, str] = {}  # eval prompts shorter than n words, matched whole
        for name, prompts in eval_sets.items():
            for p in prompts:
                words = re.findall(r"\w+", p.lower())
                if len(words) < n:
                    if words:
                        self.short.setdefault(" ".join(words), name)
                else:
                    for g in ngrams(p, n):
                        self.index.setdefault(g, name)

    def check(self, text: str) -> str | None:
        for g in ngrams(text, self.n):
            if g in self.index:
                return self.index[g]
        if self.short:
            joined = " " + " ".join(re.findall(r"\w+", text.lower())) + " "
            for s, name in self.short.items():
                if f" {s} " in joined:
                    return name
        return None


# ---------------------------------------------------------------- 8. mixture


def keep_share(conv_id: str, weight: float, seed: int) -> int:
    """How many copies of a conversation the mixture takes: floor(w) plus one more with probability frac(w)."""
    whole, frac = int(weight), weight - int(weight)
    u = int(hashlib.sha256(f"{seed}:{conv_id}".encode()).hexdigest()[:15], 16) / 16**15
    return whole + (u < frac)


# ---------------------------------------------------------------- the pipeline


class Cleaner:
    """Steps 2-7 for one conversation at a time (`step`), in order. What it remembers of the conversations seen
    is small per conversation (ids, a 16-byte digest of the first exchange, MinHash bands), not their text."""

    def __init__(self, p: IngestParams, decon: Decontaminator | None):
        self.p, self.decon = p, decon
        self.counts = Stats(html_or_artefacts_cleaned=0, roles_repaired=0)
        self.seen_pairs: dict[bytes, str] = {}
        self.seen_ids: set[str] = set()
        self.dedup = (NearDuplicates(p.minhash_threshold, p.minhash_num_perm, p.minhash_seed)
                      if p.minhash_threshold > 0 else None)

    def step(self, c: dict) -> tuple[dict | None, dict | None]:
        """(the cleaned conversation, None) if kept, else (None, its drop row)."""
        p, counts = self.p, self.counts
        msgs = []
        for m in c["messages"]:
            text = clean_text(m["content"])
            counts.add("html_or_artefacts_cleaned", text != m["content"].strip())
            msgs.append({"role": m["role"], "content": text})
        msgs, why, repaired = fix_roles(msgs)
        counts.add("roles_repaired", repaired)
        detail = None
        if why is None and c["id"] in self.seen_ids:
            why, detail = "duplicate_id", c["origin"]
        if why is None and any(m["role"] == "assistant" and m["content"].startswith(BLOCKED) for m in msgs):
            why = "blocked"  # ChatGPT's rate-limit reply saved as an answer
        if why is None:
            name = names_teacher(msgs, p.teacher_names)
            why, detail = ("names_teacher", name) if name else (None, None)
        if why is None:
            why = language_reason(msgs, p.languages, p.min_language_chars)
        pair = _digest(first_pair(msgs)) if why is None else None
        if why is None and pair in self.seen_pairs:
            why, detail = "duplicate", self.seen_pairs[pair]
        if why is None and self.decon is not None:
            asked = (m["content"] for m in msgs if m["role"] in ("user", "system"))
            hit = next((h for h in map(self.decon.check, asked) if h), None)
            why, detail = ("contaminated", hit) if hit else (None, None)
        if why is None and self.dedup is not None:
            twin = self.dedup.twin(c["id"], word_shingles(" ".join(m["content"] for m in msgs), p.minhash_ngram))
            if twin is not None:
                why, detail = "near_duplicate", twin
        self.seen_ids.add(c["id"])
        if why is not None:
            return None, drop_row("clean", why.split(":")[0], detail or (why.split(":", 1)[1] if ":" in why else None),
                                  id=c["id"], source=c["source"], origin=c["origin"])
        self.seen_pairs[pair] = c["id"]
        return {**c, "messages": msgs}, None


def _digest(pair: tuple[str, str]) -> bytes:
    return hashlib.blake2b("\x00".join(pair).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def clean(convs: list[dict], p: IngestParams, decon: Decontaminator | None) -> tuple[list[dict], list[dict], dict]:
    """Steps 2-7 over conversations in order: (kept, dropped with reasons, counters)."""
    cleaner, kept, dropped = Cleaner(p, decon), [], []
    for c in convs:
        conv, drop = cleaner.step(c)
        (kept.append(conv) if conv is not None else dropped.append(drop))
    return kept, dropped, cleaner.counts.counts()


SCHEMA = {"id": pl.String, "source": pl.String, "original_id": pl.String, "licence": pl.String, "origin": pl.String,
          "messages": pl.List(pl.Struct({"role": pl.String, "content": pl.String})), "copy": pl.Int64}
DROPPED_SCHEMA = {"id": pl.String, "source": pl.String, "origin": pl.String, "step": pl.String, "reason": pl.String,
                  "detail": pl.String}


def build(p: IngestParams, generated: list[dict] | None, eval_sets: dict[str, list[str]], rows=None, dropped=None):
    """The whole stage without file writes, streamed: each source is read record by record and every row goes
    out as soon as it is decided, into `rows` and `dropped` (lists by default, `ShardWriter`s in `main`), so
    memory does not grow with the corpus' text. Returns (rows, dropped, metrics)."""
    rows = [] if rows is None else rows
    dropped = [] if dropped is None else dropped
    weights = p.mixtures[p.mixture]
    read_stats: dict = {}
    cleaner = Cleaner(p, Decontaminator(eval_sets, p.decontam_ngram) if eval_sets else None)
    per_source, total_rows, total_read, malformed, drops = {}, 0, 0, 0, Stats()

    def drop(row: dict) -> None:
        dropped.append(row)
        drops.drop(row["reason"])

    for name, w in weights.items():  # only the mixture's sources are read, in the mixture's order
        src = p.sources[name]
        got = {"read": 0, "clean": 0, "in_mixture": 0, "weight": w, "malformed": 0}
        records_seen = 0
        for conv, bad in iter_source(name, src, generated, p.max_message_chars, read_stats):
            records_seen += 1
            if bad is not None:
                got["malformed"] += bad["kind"] == "malformed"
                log(f"ingest: {bad['origin']}: {bad['kind']} record ({name}): {bad['reason']}")
                drop(drop_row("read", bad["kind"], bad["reason"], id=None, source=name, origin=bad["origin"]))
                continue
            got["read"] += 1
            kept, why = cleaner.step(conv)
            if kept is None:
                drop(why)
            elif src.cap and got["clean"] >= src.cap:
                drop(drop_row("cap", "over_cap", str(src.cap), id=kept["id"], source=name, origin=kept["origin"]))
            else:
                got["clean"] += 1
                for k in range(keep_share(kept["id"], w, p.seed)):
                    rows.append({**kept, "copy": k})
                    got["in_mixture"] += 1
        if not records_seen:
            where = src.path or paths.SELECTED
            log(f"ingest: warning: source {name!r} ({where}) holds no records; check sources.{name}.path")
        per_source[name] = got
        total_rows += got["in_mixture"]
        total_read += got["read"]
        malformed += got["malformed"]
    metrics = {"mixture": p.mixture, "conversations": total_rows, "read": total_read, "malformed": malformed,
               "text_repaired": read_stats.get("repaired", 0),
               DROPPED: drops.dropped_by_reason(), **cleaner.counts.counts(), "sources": per_source}
    return rows, dropped, metrics


def main() -> None:
    from stages.lib.formats import read_prompts

    p = load_params(IngestParams, "ingest")
    generated = None
    if any(p.sources[s].format == "generated" for s in p.mixtures[p.mixture]):
        generated = read_shards(paths.SELECTED, "kept").to_dicts()
    eval_sets = {path: [x["instruction"] for x in read_prompts(path)] for path in p.decontaminate}
    with atomic_dir(paths.CONVERSATIONS) as tmp:  # shards are written as they fill
        rows = ShardWriter(tmp, "conversations", SCHEMA, p.rows_per_shard)
        dropped = ShardWriter(tmp, "dropped", DROPPED_SCHEMA, p.rows_per_shard)
        _, _, metrics = build(p, generated, eval_sets, rows, dropped)
        rows.close()
        dropped.close()
    write_json(paths.metrics("ingest"), metrics)
    log(f"ingest ({p.mixture}): {metrics['conversations']} conversations; dropped {metrics['dropped_by_reason']}")


if __name__ == "__main__":
    run_main(main, IngestParams, "ingest")
