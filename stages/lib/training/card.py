"""The student's model card (`models/student/README.md`): what it is, how it was made, and its lineage.

The lineage is every data and model output of every stage upstream of `train` in the stage graph
(`paths.INPUTS` and `paths.OUTPUTS`, which a test checks against dvc.yaml), with the content hash
dvc.lock records for it.
"""

from __future__ import annotations

from dataclasses import asdict

import yaml

from stages.lib import paths

APPEND_ONLY = (paths.TEACHER_CACHE, paths.SELECT_CACHE, paths.EVAL_CACHE)
"""Persist outputs that grow with every other experiment: on the card they would change it without
changing the model."""


def upstream(stage: str) -> list[str]:
    """The stages whose outputs `stage` reads, directly or through others, in pipeline order."""
    producer = {out: s for s, outs in paths.OUTPUTS.items() for out in outs}
    seen: set[str] = set()
    todo = [producer[x] for x in paths.INPUTS[stage] if x in producer]
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo += [producer[x] for x in paths.INPUTS[s] if x in producer]
    return [s for s in paths.OUTPUTS if s in seen]


def lineage(lock_path: str = "dvc.lock", stage: str = "train") -> list[tuple[str, str, str]]:
    """(stage, output, content hash) for every data and model output upstream of `stage` recorded in
    dvc.lock (metrics files and append-only caches left out); [] without a dvc.lock."""
    try:
        lock = yaml.safe_load(open(lock_path, encoding="utf-8")) or {}
    except FileNotFoundError:
        return []
    rows = []
    for s in upstream(stage):
        for out in (lock.get("stages", {}).get(s) or {}).get("outs", []):
            if out["path"].startswith("metrics/") or out["path"].rstrip("/") in APPEND_ONLY:
                continue
            rows.append((s, out["path"], out.get("md5") or out.get("hash", "")))
    return rows


def model_card(p, student: str, dtype: str, meta: dict, n_examples: int, n_tokens: int,
               lines: list[tuple[str, str, str]]) -> str:
    """README.md for the student: what it is, how it was made (`p`: the train params), and the hashes
    from seeds to weights (`lines`, from `lineage`)."""
    table = "\n".join(f"| `{s}` | `{o}` | `{h}` |" for s, o, h in lines) or "| (no dvc.lock found) | | |"
    params = "\n".join(f"- `{k}`: `{v}`" for k, v in sorted(asdict(p).items()))
    return f"""---
base_model: {student}
library_name: transformers
tags: [stillhouse, distillation, {p.method}]
---

# Student distilled with stillhouse

Fine-tuned from `{student}` ({p.method}) on {n_examples} teacher-written examples
({n_tokens} tokens, template `{meta.get("template")}`, max length {meta.get("max_seq_len")}).
Weights dtype: `{dtype}` (the dtype it was trained in).
The tokenizer's chat template is the training template, so `apply_chat_template` gives the
model its training format; try it with `python -m stages.tools.chat --model <this folder>`.

## Lineage

Content hashes (DVC) of every stage output this model was built from:

| stage | output | hash |
|---|---|---|
{table}

Tokenizer id: `{meta.get("tokenizer_id")}`

## Training params

{params}
"""
