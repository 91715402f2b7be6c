"""One stats vocabulary for every stage, datatrove's way (`pipeline/base.py` `stat_update`,
`pipeline/filters/base_filter.py`): a `Stats` counter that steps `add` to and `drop` a row on with
a reason, that `merge`s with another step's counts, and that renders as a stage's metrics with the
drops under one key, `dropped_by_reason`.

Every dropped row a stage keeps carries the same three columns, `step` (where it was dropped),
`reason` (a short snake_case name, the key counted in `dropped_by_reason`) and `detail` (free
text: the score, the server's message, the offending value): build it with `drop_row`.

    stats = Stats()
    for row in rows:
        if too_short(row):
            stats.drop("too_short")
            drops.append(drop_row("rules", "too_short", f"{n} words", **row))
            continue
        stats.add("kept")
    stats.merge(other_step_stats)
    metrics = stats.metrics()   # {"kept": 3, "dropped_by_reason": {"too_short": 1}}
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

DROPPED = "dropped_by_reason"
_DROP_PREFIX = "dropped:"


class Stats(Counter):
    """Named counts (ints or floats: tokens, dollars) plus drops by reason, kept as `dropped:<reason>`."""

    def add(self, name: str, n: float = 1) -> None:
        """Count `n` more of `name`."""
        self[name] += n

    def drop(self, reason: str, n: int = 1) -> None:
        """Count `n` rows dropped for `reason`."""
        self[_DROP_PREFIX + reason] += n

    def merge(self, *others: Counter) -> Stats:
        """Add every count of `others` to this one (in place); returns self."""
        for other in others:
            for k, v in other.items():
                self[k] += v
        return self

    def dropped_by_reason(self) -> dict[str, int]:
        """{reason: rows}, sorted by reason, only reasons that dropped something."""
        return {k[len(_DROP_PREFIX):]: v for k, v in sorted(self.items()) if k.startswith(_DROP_PREFIX) and v}

    @property
    def dropped(self) -> int:
        """Rows dropped, every reason together."""
        return sum(self.dropped_by_reason().values())

    def counts(self) -> dict[str, Any]:
        """The named counts without the drops, sorted by name."""
        return {k: v for k, v in sorted(self.items()) if not k.startswith(_DROP_PREFIX)}

    def metrics(self) -> dict[str, Any]:
        """What a stage writes: every named count, and `dropped_by_reason` (always present, maybe empty)."""
        return {**self.counts(), DROPPED: self.dropped_by_reason()}

    @staticmethod
    def tally(items: Iterable[str]) -> dict[str, int]:
        """{item: how often it occurs}, sorted by item: a plain count that is not a drop (e.g. answers)."""
        return dict(sorted(Counter(items).items()))

    @classmethod
    def of_drops(cls, reasons: Iterable[str]) -> Stats:
        """A Stats with one drop per item of `reasons` (e.g. a drops table's `reason` column)."""
        out = cls()
        for r in reasons:
            out.drop(r)
        return out


def drop_row(step: str, reason: str, detail: str = "", **fields: Any) -> dict[str, Any]:
    """A dropped row as every stage keeps it: the row's own fields, then `step`, `reason`, `detail`."""
    return {**fields, "step": step, "reason": reason, "detail": detail}
