"""Shared plumbing for every stage: params, atomic writes, parquet shards, progress.

Each stage module reads only its own `params.yaml` section through `load_params`,
writes its outputs through `atomic_dir` / `write_json` (temporary path, then rename,
so a crash leaves the old output or the new one, never half of one), and reports long
loops through `progress`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import polars as pl
import pyarrow.parquet as pq
import yaml

PARAMS_FILE = "params.yaml"
T = TypeVar("T")


class StageError(Exception):
    """Bad input or bad params: the stage stops with this message and nothing is written."""


# ---------------------------------------------------------------- params


def load_params(cls: type[T], section: str, path: str | os.PathLike = PARAMS_FILE) -> T:
    """Build the dataclass `cls` from one top-level section of `params.yaml`.

    Unknown keys are an error (a typo in `dvc exp run -S` must not be ignored);
    missing keys take the dataclass default; `__post_init__` checks the values.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise StageError(f"{path}: not found (run from the project root)") from None
    if section not in data:
        raise StageError(f"{path}: no '{section}' section")
    return params_from_dict(cls, data[section] or {}, where=f"{path}: {section}")


def params_from_dict(cls: type[T], values: dict[str, Any], where: str = "params") -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise StageError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise StageError(f"{where}: {e}") from None


def check(cond: bool, msg: str) -> None:
    """`__post_init__` helper: raise ValueError(msg) unless cond."""
    if not cond:
        raise ValueError(msg)


# ---------------------------------------------------------------- atomic outputs


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


# ---------------------------------------------------------------- parquet shards


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


# ---------------------------------------------------------------- logging and progress


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """A tqdm bar on a terminal; plain `desc: done/total, rate, extras` lines every `every_s` seconds otherwise."""

    def __init__(self, total: int | None, desc: str, every_s: float = 10.0, extra=None):
        """`extra`: a function returning {name: value} shown beside the count, called only when shown."""
        self.total, self.desc, self.every_s, self.extra_fn = total, desc, every_s, extra
        self.n, self.extra = 0, {}
        self._shown = 0.0
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=sys.stderr)

    def update(self, n: int = 1, **extra) -> None:
        self.n += n
        self.extra.update(extra)
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(n)
            if self.extra_fn and now - self._shown > 0.2:
                self._shown = now
                self.bar.set_postfix(self.extra_fn(), refresh=False)
            return
        if now - self.last >= self.every_s:
            self.last = now
            log(f"{self.desc}: {self._line(now)}")

    def _line(self, now: float) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        rate = self.n / max(1e-9, now - self.start)
        extra = {**self.extra, **(self.extra_fn() if self.extra_fn else {})}
        extras = "".join(f", {k} {v}" for k, v in extra.items())
        return f"{self.n}{of} in {now - self.start:.0f}s ({rate:.2f}/s{extras})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            log(f"{self.desc}: done, {self._line(time.monotonic())}")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", every_s: float = 10.0) -> Iterator[T]:
    """Iterate with a `Progress` report."""
    bar = Progress(total, desc, every_s)
    for item in items:
        yield item
        bar.update()
    bar.close()


def run_main(fn) -> None:
    """Run a stage's main(); a StageError prints one clean line and exits 1."""
    if not sys.stderr.isatty():  # no bars in logs: our own progress lines say enough
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. the GGUF de-quantisation bar
        with contextlib.suppress(ImportError):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    try:
        fn()
    except StageError as e:
        log(f"ERROR: {e}")
        sys.exit(1)


def set_threads(n: int = 0) -> None:
    """Use every core for torch on CPU unless `n` says otherwise."""
    import torch

    torch.set_num_threads(n or os.cpu_count() or 1)
