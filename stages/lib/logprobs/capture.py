"""Capture a teacher's top-k log-probabilities for one split of the token arrays, shard by shard, resumably.

`capture(out, tokens, split, source, k)` first refuses a teacher whose tokenizer is not the one the token
arrays were made with (`same_tokenizer`: one line, before any weight is loaded or request sent: KD compares
distributions over one shared vocabulary). It then writes `meta.json` (format.py) and one shard per
range of `shard_examples` examples. A shard already there with this capture's identity (teacher, tokenizer,
k, template, codec) and the same examples is kept, so an interrupted capture resumes where it stopped and a
rerun computes nothing; a changed identity discards the old shards. With a `cache` (cache.ScoreCache, the
endpoint's default), each example's answer is also kept by content the moment it arrives, so even the
examples of an unfinished shard are not asked again.

A source scores examples: `name`, `teacher_id` (its identity), `tokenizer_id`, `vocab_size` and
`topk(examples, k, on_done)` returning (ids [p, k], logprobs [p, k], log_rest [p]) per example, at its trained
positions (`format.trained_positions`): local.LocalTeacher and vllm.VllmTeacher.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.lib.errors import StageError
from stages.lib.io import write_json
from stages.lib.logprobs.cache import ScoreCache, cached_topk
from stages.lib.logprobs.format import (
    CODECS,
    FORMAT,
    content_key,
    digest,
    ranges,
    shard_matches,
    shard_name,
    trained_positions,
    write_shard,
)
from stages.lib.progress import log
from stages.lib.tokens.arrays import TokenSplit


@dataclass
class CaptureReport:
    shards: int = 0
    computed: int = 0
    """Shards scored by this run."""
    reused: int = 0
    """Shards found complete (this capture's identity, the same examples) and kept."""
    examples: int = 0
    positions: int = 0
    """Trained positions captured (one row of k ids each)."""
    bytes: int = 0
    """Bytes of the shards on disk."""

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.positions if self.positions else 0.0


def same_tokenizer(source, tokens_meta: dict) -> None:
    """Refuse a teacher whose vocabulary is not the token arrays' (the student's)."""
    want = tokens_meta.get("tokenizer_id")
    if source.tokenizer_id != want:
        raise StageError(f"teacher {source.name}: its tokenizer (sha256 {source.tokenizer_id[:12]}) is not the "
                         f"student's ({tokens_meta.get('tokenizer', '?')}, sha256 {str(want)[:12]}): distillation "
                         "from log-probabilities needs one shared vocabulary; use a teacher of the student's family")


def capture_meta(source, tokens: TokenSplit, split: str, k: int, codec: str, shard_examples: int) -> dict:
    identity = {"teacher": source.teacher_id, "tokenizer_id": source.tokenizer_id, "k": k,
                "template": tokens.meta.get("template"), "codec": codec}
    return {"format": FORMAT, "split": split, "examples": len(tokens), "shard_examples": shard_examples,
            "teacher_name": source.name, "vocab_size": source.vocab_size, "identity": identity,
            "identity_key": digest(identity)}


def start(out: Path, meta: dict) -> None:
    """Write `meta.json`; shards of another capture (identity, split or shard size) go first."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        old = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        old = None
    if old != meta:
        stale = sorted(out.glob("*.npz"))
        if stale:
            log(f"teacher log-probabilities {out}: another capture's {len(stale)} shards discarded")
        for p in stale:
            p.unlink()
        write_json(out / "meta.json", meta)


def check_rows(rows: list, examples: list, k: int, where: str) -> None:
    for e, ((ids, mask), r) in enumerate(zip(examples, rows)):
        want = len(trained_positions(mask))
        if r[0].shape != (want, k) or r[1].shape != (want, k) or r[2].shape != (want,):
            raise StageError(f"{where}: example {e}: the teacher gave {r[0].shape} rows, expected ({want}, {k})")


def capture(out: str | Path, tokens_folder: str | Path, split: str, source, k: int, codec: str = "uint16",
            shard_examples: int = 256, cache: ScoreCache | None = None) -> CaptureReport:
    """Fill `out` with `source`'s top-k at every trained position of `split`; see the module docstring."""
    out = Path(out)
    tokens = TokenSplit(tokens_folder, split)
    same_tokenizer(source, tokens.meta)
    if not 1 <= k <= source.vocab_size:
        raise StageError(f"k={k}: expected 1..{source.vocab_size} (the teacher's vocabulary)")
    if codec not in CODECS or shard_examples < 1:
        raise StageError(f"codec {codec!r} (one of {CODECS}), shard_examples {shard_examples} (>= 1)")
    meta = capture_meta(source, tokens, split, k, codec, shard_examples)
    start(out, meta)
    report, names = CaptureReport(), set()
    for s, e in ranges(len(tokens), shard_examples):
        examples = [tokens[i] for i in range(s, e)]
        path = out / shard_name(split, s, e)
        names.add(path.name)
        content = content_key(examples)
        report.shards += 1
        report.examples += len(examples)
        report.positions += sum(len(trained_positions(m)) for _, m in examples)
        if shard_matches(path, meta["identity_key"], content):
            report.reused += 1
            report.bytes += path.stat().st_size
            continue
        rows = (cached_topk(source, cache, examples, k, meta["identity"]["template"]) if cache is not None
                else source.topk(examples, k))
        check_rows(rows, examples, k, f"teacher {source.name}, examples {s}-{e}")
        report.bytes += write_shard(path, rows, codec, source.vocab_size, meta["identity_key"], content)
        report.computed += 1
    for p in out.glob("*.npz"):
        if p.name not in names:
            p.unlink()
    log(f"teacher log-probabilities {out}: {report.shards} shards ({report.reused} kept, {report.computed} "
        f"computed), {report.positions} positions, {report.bytes_per_token:.1f} bytes per token")
    return report


def report_dict(report: CaptureReport) -> dict:
    return {**asdict(report), "bytes_per_token": round(report.bytes_per_token, 2)}
