"""Each example's captured rows kept by content in the teacher store, so no example is scored (or paid for) twice.

The key is sha256 over the teacher's identity, the tokenizer's (`tokens.arrays.tokenizer_id`), k, the
template and the example's token ids and mask: the same example asked of the same teacher is answered from
here, by any capture, experiment or on-policy step (a student's sample scored before is not scored again).
The store is the one the teacher's text answers live in (`llm.store.store_dir`: outside the repository, so it
outlives DVC's temporary experiment workspaces); records are write-once files

    v1/logprobs/<key[:2]>/<key[2:4]>/<key>.npz   ids int32 [p, k], logprobs float32 [p, k], log_rest float32 [p]

unquantised (what the teacher said), written to a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from stages.lib.io import atomic_file
from stages.lib.llm.store import LAYOUT, store_dir
from stages.lib.logprobs.format import read_shard


class ScoreCache:
    """Per-example captured rows under `root` (default: the teacher store), keyed by content."""

    def __init__(self, root: str | Path | None = None):
        self.root = (Path(root) if root else store_dir()) / LAYOUT / "logprobs"
        self.hits = self.misses = 0

    @staticmethod
    def key(teacher_id: str, tokenizer_id: str, k: int, template: str | None, ids, mask) -> str:
        head = json.dumps({"teacher": teacher_id, "tokenizer": tokenizer_id, "k": k, "template": template},
                          sort_keys=True)
        h = hashlib.sha256(head.encode())
        h.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|" + np.asarray(mask, dtype=np.uint8).tobytes())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key[2:4] / f"{key}.npz"

    def get(self, key: str):
        z = read_shard(self._path(key))
        if z is None or str(z.get("key")) != key:
            return None
        return z["ids"].astype(np.int64), z["logprobs"], z["log_rest"]

    def put(self, key: str, rows) -> None:
        ids, lp, rest = rows
        with atomic_file(self._path(key), "wb") as f:
            np.savez(f, key=np.array(key), ids=np.asarray(ids, np.int32), logprobs=np.asarray(lp, np.float32),
                     log_rest=np.asarray(rest, np.float32))


def cached_topk(source, cache: ScoreCache, examples: list, k: int, template: str | None) -> list:
    """`source.topk(examples, k)`, asking the source only for the examples the cache does not hold, and keeping
    each answer the moment the source has it (its `on_done`), so an interrupted call loses none it got."""
    keys = [cache.key(source.teacher_id, source.tokenizer_id, k, template, ids, mask) for ids, mask in examples]
    rows = [cache.get(key) for key in keys]
    missing = [i for i, r in enumerate(rows) if r is None]
    cache.hits += len(examples) - len(missing)
    cache.misses += len(missing)

    def keep(j: int, r) -> None:
        cache.put(keys[missing[j]], r)
        rows[missing[j]] = r

    if missing:
        source.topk([examples[i] for i in missing], k, keep)
    return rows
