"""Atomic outputs and parquet shards: `atomic_dir` / `atomic_file` / `write_json` write to a temporary
path and rename it, so a crash leaves the old output or the new one, never half of one; `write_shards`
gives byte-identical shards for the same rows, so an unchanged dataset keeps its DVC hash."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import polars as pl
import pyarrow.parquet as pq

from stages.lib.errors import StageError



@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `path`; on success it replaces `path`.

    On an exception the temporary directory is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file next to `path`; rename it over `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")



def write_shards(df: pl.DataFrame, out_dir: Path, prefix: str = "part", rows_per_shard: int = 50_000) -> list[Path]:
    """Write `df` as fixed-size shards `{prefix}-00000.parquet`, ... into `out_dir`.

    Same rows in the same order give byte-identical files (zstd, fixed row groups), so
    an unchanged dataset keeps its DVC hash. An empty frame still writes one shard
    that carries the schema.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    n = max(1, -(-df.height // rows_per_shard))
    for i in range(n):
        part = df.slice(i * rows_per_shard, rows_per_shard)
        p = out_dir / f"{prefix}-{i:05d}.parquet"
        with atomic_file(p, "wb") as f:
            pq.write_table(part.to_arrow(), f, compression="zstd", row_group_size=rows_per_shard)
        paths.append(p)
    return paths


def read_shards(in_dir: str | os.PathLike, prefix: str = "part") -> pl.DataFrame:
    files = sorted(Path(in_dir).glob(f"{prefix}-*.parquet"))
    if not files:
        raise StageError(f"{in_dir}: no {prefix}-*.parquet shards (did the upstream stage run?)")
    return pl.concat([pl.read_parquet(f) for f in files], how="vertical")
