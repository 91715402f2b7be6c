"""Where answers are written: the teacher store outside the repository (`TeacherStore`) and the
workspace cache's append-only run files (`RunFiles`, read by `stages.lib.llm.cache`).

The teacher store keeps every paid response and Batch job id outside the repository.

`dvc exp run --temp` and queued experiments run in a copy of the workspace that DVC deletes when
the run fails (generate fails on its failure rate, its budget or a Batch job still running), and
with it the persist cache `data/teacher_cache`. So `ResponseCache` writes each response and each
Batch job id here too, the moment it arrives, and reads from here before it calls the teacher.
The DVC-tracked cache stays the thing that is pushed and pulled: a response found only here is
copied into it.

Where: `generate.teacher_store` / `evaluate.teacher_store` when set, else the environment variable
`STILLHOUSE_TEACHER_STORE`, else `$XDG_CACHE_HOME/stillhouse/teacher` (`~/.cache/stillhouse/teacher`).
It must be an absolute path: a relative one would land inside the temporary workspace.

Layout (content-addressed, write-once files; see docs/teacher-cache.md):

    v1/responses/<identity[:2]>/<identity[2:4]>/<identity>-<key>.json   one response record
    v1/batches/<batch id>.json                                          a submitted Batch job: id, input file, keys
    v1/batches/<batch id>.done                                          the job's results were collected

`identity` is the request's identity without its token limit (`cache.identity_key`), so the
answers to one request under every `max_new_tokens` sit side by side (a million answers make
about 15 files per folder). Each file is written to a
unique temporary name in its folder and renamed into place, so readers never see half a file and
any number of runs (two experiments at once) can write side by side: they write different names,
or the same record for the same key, and the last rename wins.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Callable

from stages.lib.errors import StageError
from stages.lib.progress import log
from stages.lib.text.clean import clean_json

STORE_ENV = "STILLHOUSE_TEACHER_STORE"
LAYOUT = "v1"
_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def store_dir(param: str | None = None) -> Path:
    """The store folder: the param, else $STILLHOUSE_TEACHER_STORE, else the XDG cache folder."""
    raw = param or os.environ.get(STORE_ENV)
    if raw:
        path = Path(os.path.expandvars(os.path.expanduser(raw)))
        if not path.is_absolute():
            raise StageError(f"teacher store {raw!r}: must be an absolute path (set by teacher_store or {STORE_ENV}); "
                             "a relative one would sit inside DVC's temporary experiment workspace")
        return path
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stillhouse" / "teacher"


def _write_once(path: Path, data: bytes, durable: bool = False) -> None:
    """Write `data` to a unique temporary file beside `path` (its folder exists), then rename it over `path`."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_bytes().decode("utf-8", "replace"))
    except FileNotFoundError:
        return None
    except ValueError:
        log(f"teacher store: {path}: unreadable record skipped")
        return None
    return rec if isinstance(rec, dict) else None


def _batch_name(batch_id: str) -> str:
    if _SAFE.match(batch_id) and not batch_id.startswith("."):
        return batch_id
    import hashlib

    return "h-" + hashlib.sha256(batch_id.encode()).hexdigest()


class TeacherStore:
    """Response records by (identity, key) and Batch jobs, as write-once files under `root`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.base = self.root / LAYOUT
        self._made: set[Path] = set()  # shard folders known to exist
        try:
            (self.base / "responses").mkdir(parents=True, exist_ok=True)
            (self.base / "batches").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StageError(f"teacher store {self.root}: cannot create it ({e.strerror}); move it with "
                             f"teacher_store or {STORE_ENV}") from None

    def _dir(self, identity: str) -> Path:
        return self.base / "responses" / identity[:2] / identity[2:4]

    def get(self, identity: str, key: str) -> dict | None:
        rec = _read(self._dir(identity) / f"{identity}-{key}.json")
        return rec if rec is not None and rec.get("key") == key else None

    def candidates(self, identity: str) -> list[dict]:
        """Every record stored under `identity` (all token limits), in key order."""
        try:
            names = sorted(e.name for e in os.scandir(self._dir(identity))
                           if e.name.startswith(f"{identity}-") and e.name.endswith(".json"))
        except FileNotFoundError:
            return []
        return [rec for n in names for rec in [_read(self._dir(identity) / n)] if rec is not None and "key" in rec]

    def put(self, rec: dict) -> None:
        identity = rec.get("identity") or rec["key"]
        d = self._dir(identity)
        if d not in self._made:
            d.mkdir(parents=True, exist_ok=True)
            self._made.add(d)
        data = json.dumps(rec, sort_keys=True, ensure_ascii=False).encode("utf-8")
        _write_once(d / f"{identity}-{rec['key']}.json", data)

    def batches(self) -> list[dict]:
        """Batch jobs whose results were not collected yet, oldest first."""
        out = []
        for f in sorted((self.base / "batches").glob("*.json")):
            if f.with_suffix(".done").exists():
                continue
            rec = _read(f)
            if rec is not None and "batch_id" in rec:
                out.append(rec)
        return sorted(out, key=lambda r: (r.get("created", ""), r["batch_id"]))

    def add_batch(self, rec: dict) -> None:
        data = json.dumps(rec, sort_keys=True, ensure_ascii=False).encode("utf-8")
        _write_once(self.base / "batches" / f"{_batch_name(rec['batch_id'])}.json", data, durable=True)

    def batch_done(self, batch_id: str) -> None:
        _write_once(self.base / "batches" / f"{_batch_name(batch_id)}.done", b"", durable=True)


class RunFiles:
    """One run's append-only files in a cache folder, `<kind>-<time>-<pid>.jsonl`, flushed per record (so
    a killed process loses nothing written), fsynced at most every `fsync_every_s`; and the mirror of
    what is written into the store, where a failing store is reported once and never loses an answer."""

    def __init__(self, path: Path, fsync_every_s: float = 1.0, store: TeacherStore | None = None):
        self.dir = path
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
        self._store, self._store_failed = store, False
        self._open: dict[str, object] = {}
        self._fsync_every_s, self._synced = fsync_every_s, time.monotonic()
        self.write_error: OSError | None = None  # the first failed write here (a full disk)
        self.unwritten = 0  # writes that failed

    def read(self, kind: str):
        """Every record of every run's `kind` file, oldest file first; a line cut short by a crash is skipped."""
        for f in sorted(self.dir.glob(f"{kind}-*.jsonl")):
            text = f.read_bytes().decode("utf-8", "replace")
            for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a line
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or not ("key" in rec or "batch_id" in rec):
                        raise ValueError
                except ValueError:
                    log(f"teacher cache: {f}:{lineno}: incomplete entry skipped")
                    continue
                yield clean_json(rec)

    def append(self, kind: str, rec: dict) -> None:
        """Append `rec`; a failed write (a full disk) is remembered, not raised: the round goes on, with the
        answers in memory and the store, and `check_written` stops it at its end."""
        try:
            f = self._open.get(kind)
            if f is None:
                f = self._open[kind] = open(self.dir / f"{kind}-{self.run}.jsonl", "a", encoding="utf-8")
            f.write(json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n")
            f.flush()  # in the OS now: survives the process being killed
            if time.monotonic() - self._synced > self._fsync_every_s:
                self.sync()
        except OSError as e:
            self._unwritten(e)

    def _unwritten(self, e: OSError) -> None:
        if self.write_error is None:
            stored = self._store is not None and not self._store_failed
            where = f"; they are in the teacher store {self._store.root}" if stored else ""
            log(f"teacher cache {self.dir}: cannot write ({e.strerror or e}); answers are kept in memory{where}")
        self.write_error = e
        self.unwritten += 1

    def check_written(self) -> None:
        """Raise one line naming this folder when a write to it failed."""
        if self.write_error is not None:
            e = self.write_error
            kept = (f"kept in the teacher store {self._store.root}, the next run copies them back"
                    if self._store and not self._store_failed else "not kept: they are asked again next run")
            raise StageError(f"teacher cache {self.dir}: cannot write ({e.strerror or e}); {self.unwritten} records "
                             f"not written there ({kept}); free space there and rerun")

    def mirror(self, write: Callable[..., None], *args) -> None:
        """`write(store, *args)` (a TeacherStore method) when there is a store."""
        if self._store is None:
            return
        try:
            write(self._store, *args)
        except OSError as e:
            if not self._store_failed:
                log(f"teacher store {self._store.root}: cannot write ({e}); answers are kept in {self.dir} only")
            self._store_failed = True

    def sync(self) -> None:
        try:
            for f in self._open.values():
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self._unwritten(e)
        self._synced = time.monotonic()

    def close(self) -> None:
        self.sync()
        for f in self._open.values():
            try:
                f.close()
            except OSError as e:
                self._unwritten(e)
        self._open = {}
