"""Logging and progress: `log` writes one line to stderr; `Progress` / `progress` show a tqdm bar on a
terminal and a plain `desc: done/total, rate` line every few seconds in logs."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")



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
