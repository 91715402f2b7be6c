"""Stage `tokenize`: render conversations with the student template, tokenize, mask, split.

Conversations (from `ingest`) are rendered with the template and tokenized segment by segment
with the student's tokenizer (`student.model`);
only assistant turns (with their end-of-turn token) are trained. A conversation longer than
`max_seq_len` is split at round boundaries (each piece keeps the system message), never losing
its final round; a single round that does not fit loses the end of its answer, and the tokens
dropped are counted.

The output, `data/tokens`, is in the on-disk format of stages/lib/tokens/arrays.py (token, mask
and index arrays and the texts per split, and `meta.json`).
The train/validation split hashes each conversation's first user message, so a conversation
stays in its split when others are added or removed, and its pieces stay together.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from stages.lib import paths
from stages.lib.errors import StageError, check
from stages.lib.io import atomic_dir, read_shards, write_json
from stages.lib.params import load_params, run_main
from stages.lib.progress import log
from stages.lib.student import load_student
from stages.lib.tokens.arrays import token_dtype, write_meta, write_split
from stages.lib.tokens.templates import TEMPLATES, encode_conversation, render_prompt


@dataclass
class TokenizeParams:
    template: str = "alpaca"
    """Prompt template: `alpaca` (with-input / no-input) or `chat` (the student's chat template)."""
    max_seq_len: int = 512
    """Longest example in tokens: a longer conversation is split at round boundaries; a single round
    that does not fit loses the end of its answer (counted as `truncated`), or is dropped when its
    prompt alone does not fit (`prompt_too_long`)."""
    val_fraction: float = 0.2
    """Share of conversations held out for validation, with all their pieces (at least one when there
    are two or more)."""
    split_seed: int = 0
    """Salt of the split hash."""

    def __post_init__(self):
        check(self.template in TEMPLATES, f"template: expected one of {TEMPLATES}, got {self.template!r}")
        check(self.max_seq_len >= 16, "max_seq_len: must be >= 16")
        check(0 <= self.val_fraction < 1, "val_fraction: must be in [0, 1)")


def split_of(first_user: str, salt: int) -> float:
    """A uniform number in [0, 1) from a conversation's first user message (`assign_splits` compares it
    with `val_fraction`). The trailing NUL is the empty Alpaca input the hash has always covered:
    dropping it would move conversations between splits."""
    h = hashlib.sha256(f"{salt}\x00{first_user}\x00".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def first_user_message(messages: list[dict]) -> str:
    """The content of a conversation's first user turn ("" when it has none): its split key."""
    return next((m["content"] for m in messages if m["role"] == "user"), "")


def assign_splits(keys: list[str], val_fraction: float, salt: int) -> list[str]:
    """`train` or `val` per split key: validation where `split_of` < val_fraction, and the lowest one
    when that leaves none (two keys or more)."""
    u = [split_of(k, salt) for k in keys]
    splits = ["val" if x < val_fraction else "train" for x in u]
    if val_fraction > 0 and len(keys) >= 2 and "val" not in splits:
        splits[int(np.argmin(u))] = "val"
    return splits


def pieces(messages: list[dict], tok, template: str, max_seq_len: int):
    """Yield (messages, ids, mask, tokens_dropped, reason) per piece of a conversation.

    Rounds are packed greedily in order; a piece that would overflow starts a new one. A round
    that alone overflows is cut at max_seq_len (reason `truncated`), or dropped when its prompt
    alone does not fit (reason `prompt_too_long`).
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    rounds = [rest[k : k + 2] for k in range(0, len(rest) - 1, 2)]
    current: list[list[dict]] = []
    for rnd in rounds + [None]:
        if rnd is not None:
            ids, mask = encode_conversation(system + [m for r in current + [rnd] for m in r], template, tok)
            if len(ids) <= max_seq_len:
                current.append(rnd)
                continue
        if current:
            msgs = system + [m for r in current for m in r]
            ids, mask = encode_conversation(msgs, template, tok)
            yield msgs, ids, mask, 0, None
        current = []
        if rnd is None:
            break
        msgs = system + rnd
        ids, mask = encode_conversation(msgs, template, tok)
        if len(ids) <= max_seq_len:
            current = [rnd]
        elif 0 in mask[max_seq_len - 1:] or 1 not in mask[:max_seq_len]:
            yield msgs, None, None, len(ids), "prompt_too_long"
        else:
            yield msgs, ids[:max_seq_len], mask[:max_seq_len], len(ids) - max_seq_len, "truncated"


def example_texts(msgs: list[dict], template: str, tok) -> dict:
    """The piece's first round as evaluate reads it: instruction, output and the rendered prompt."""
    user = next(m["content"] for m in msgs if m["role"] == "user")
    bot = next(m["content"] for m in msgs if m["role"] == "assistant")
    if template == "chat":
        head = msgs[: next(i for i, m in enumerate(msgs) if m["role"] == "user") + 1]
        prompt = tok.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
    else:
        prompt = render_prompt(user, "", template, tok)
    return {"instruction": user, "input": "", "output": bot, "prompt": prompt}


def tokenize_conversations(convs: list[dict], tok, p: "TokenizeParams") -> tuple[dict, dict]:
    """{split: [(texts, ids, mask)]} and stats."""
    splits = assign_splits([first_user_message(c["messages"]) for c in convs], p.val_fraction, p.split_seed)
    stats = {"conversations_in": len(convs), "examples": 0, "split_conversations": 0, "prompt_too_long": 0,
             "truncated": 0, "tokens_dropped": 0}
    by_split: dict[str, list] = {"train": [], "val": []}
    for c, split in zip(convs, splits):
        got = list(pieces(c["messages"], tok, p.template, p.max_seq_len))
        stats["split_conversations"] += sum(ids is not None for _, ids, _, _, _ in got) > 1
        for k, (msgs, ids, mask, dropped, why) in enumerate(got):
            stats["tokens_dropped"] += dropped
            if why:
                stats[why] += 1
            if ids is None:
                continue
            texts = {"id": f"{c['id']}#{c.get('copy', 0)}.{k}", "source": c.get("source"),
                     **example_texts(msgs, p.template, tok)}
            by_split[split].append((texts, ids, mask))
            stats["examples"] += 1
    return by_split, stats


def main() -> None:
    from transformers import AutoTokenizer

    p = load_params(TokenizeParams, "tokenize")
    student = paths.local_model(load_student().model, "student.model")
    tok = AutoTokenizer.from_pretrained(student)
    if tok.eos_token_id is None:
        raise StageError(f"{student} (student.model): tokenizer has no EOS token")
    convs = read_shards(paths.CONVERSATIONS, "conversations").to_dicts()
    dtype = token_dtype(tok)
    by_split, stats = tokenize_conversations(convs, tok, p)
    with atomic_dir(paths.TOKENS) as out:
        for split, enc in by_split.items():
            stats[split] = write_split(out, split, enc, dtype)
        write_meta(out, tok, student, dtype, p.template, p.max_seq_len)
    write_json(paths.metrics("tokenize"), stats)
    log(f"tokenize: {len(convs)} conversations -> {stats['train']['examples']} train / {stats['val']['examples']} val "
        f"examples, {stats['train']['tokens'] + stats['val']['tokens']} tokens; {stats['split_conversations']} split, "
        f"{stats['truncated']} truncated, {stats['prompt_too_long']} dropped, {stats['tokens_dropped']} tokens dropped")


if __name__ == "__main__":
    run_main(main, TokenizeParams, "tokenize")
