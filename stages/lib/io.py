"""Atomic outputs and parquet shards: `atomic_dir` / `atomic_file` / `write_json` write to a temporary
path and rename it, so a crash leaves the old output or the new one, never half of one (leftovers of a
killed run are removed, or restored, on the next entry); outputs get the umask's modes, not mkstemp's
0600/0700; `write_shards` gives byte-identical shards for the same rows, so an unchanged dataset keeps
its DVC hash; `read_shards` names the shard it cannot read."""

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

from stages.lib.errors import StageError, check


def umask() -> int:
    """The process umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path, is_dir: bool) -> None:
    """Give a mkstemp / mkdtemp path (0600 / 0700) the modes a plain open / mkdir would have."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~umask())


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def recover_leftovers(path: Path) -> None:
    """Undo what a killed `atomic_dir` / `atomic_file` left next to `path`.

    A kill between moving the old output aside and renaming the new one in leaves only
    `.<name>.old-PID`: it is put back as `path`. Every other `.<name>.tmp-*` / `.<name>.old-*` is removed.
    """
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not path.exists():
        os.replace(olds.pop(), path)
    for p in olds + list(path.parent.glob(f".{path.name}.tmp-*")):
        _remove(p)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `path`; on success it replaces `path`.

    On an exception the temporary directory is removed and `path` is left as it was. Leftovers of a
    killed earlier run are cleaned up (or the old output restored) first: `recover_leftovers`.
    """
    path = Path(path)
    tmp = staging_dir(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


def replace_dir(tmp: Path, path: Path) -> None:
    """Put the finished folder `tmp` (next to `path`) in place of `path`: the old one is moved aside to
    `.<name>.old-PID`, `tmp` renamed in, the old one removed. A kill in between is undone by `recover_leftovers`."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def staging_dir(path: str | os.PathLike) -> Path:
    """A fresh folder next to `path` that a long run fills as it goes (`replace_dir` puts it in place at the end),
    so a killed run leaves `path` as it was; leftovers of an earlier killed run are recovered first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    honour_umask(tmp, is_dir=True)
    return tmp


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file next to `path`; rename it over `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        honour_umask(Path(tmp), is_dir=False)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def refuse_nonempty_out(out: str | os.PathLike, force: bool) -> None:
    """A tool's `--out`: an existing non-empty file or folder is refused unless `--force` (replacing a folder
    deletes everything in it)."""
    path = Path(out)
    full = path.is_dir() and any(path.iterdir()) or path.is_file() and path.stat().st_size > 0
    check(force or not full, f"--out: {out} exists and is not empty; pass --force to replace it")


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
    n = max(1, -(-df.height // rows_per_shard))
    return [_write_shard(df.slice(i * rows_per_shard, rows_per_shard), out_dir / f"{prefix}-{i:05d}.parquet",
                         rows_per_shard) for i in range(n)]


def _write_shard(part: pl.DataFrame, path: Path, rows_per_shard: int) -> Path:
    with atomic_file(path, "wb") as f:
        pq.write_table(part.to_arrow(), f, compression="zstd", row_group_size=rows_per_shard)
    return path


class ShardWriter:
    """`write_shards` for rows that arrive one at a time (`append(row)`, then `close()`): each shard is written
    as soon as it fills, so memory holds one shard's rows, and the files are the ones `write_shards` writes for
    the same rows and schema."""

    def __init__(self, out_dir: Path, prefix: str, schema: dict, rows_per_shard: int = 50_000):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir, self.prefix, self.schema, self.rows_per_shard = out_dir, prefix, schema, rows_per_shard
        self.rows: list[dict] = []
        self.paths: list[Path] = []
        self.height = 0

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self.height += 1
        if len(self.rows) == self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        path = self.out_dir / f"{self.prefix}-{len(self.paths):05d}.parquet"
        self.paths.append(_write_shard(pl.DataFrame(self.rows, schema=self.schema), path, self.rows_per_shard))
        self.rows = []

    def close(self) -> list[Path]:
        """Write the last, partial shard (or the one empty shard that carries the schema); the shards' paths."""
        if self.rows or not self.paths:
            self._flush()
        return self.paths


def read_shards(in_dir: str | os.PathLike, prefix: str = "part") -> pl.DataFrame:
    files = sorted(Path(in_dir).glob(f"{prefix}-*.parquet"))
    if not files:
        raise StageError(f"{in_dir}: no {prefix}-*.parquet shards (did the upstream stage run?)")
    return pl.concat([read_parquet(f) for f in files], how="vertical")


def read_parquet(file: Path) -> pl.DataFrame:
    """One shard; an unreadable one (truncated, not parquet) is one line naming it."""
    try:
        return pl.read_parquet(file)
    except (pl.exceptions.ComputeError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StageError(f"{file}: unreadable parquet shard ({first}); rerun the stage that writes it") from None
