"""One stats vocabulary (stages/lib/stats.py): counts, drops by reason, merging, the metrics shape; and
every stage keeps to it (one key for drops, one set of drop columns, no hand-written counters)."""

from __future__ import annotations

import re

from stages.lib.stats import DROPPED, Stats, drop_row
from tests.support.tiny import ROOT


def test_counts_drops_and_merge():
    a = Stats(requests=3)
    a.add("kept", 2)
    a.drop("too_short")
    b = Stats.of_drops(["too_short", "blacklist", "too_short"])
    b.add("requests")
    assert a.merge(b) is a
    assert a.metrics() == {"kept": 2, "requests": 4, DROPPED: {"blacklist": 1, "too_short": 3}}
    assert a.dropped == 4 and a.counts() == {"kept": 2, "requests": 4}
    assert Stats().metrics() == {DROPPED: {}}  # the key is always there
    assert Stats.tally(["b", "a", "b"]) == {"a": 1, "b": 2}


def test_a_drop_row_keeps_its_fields_and_says_where_why_and_what():
    row = drop_row("rules", "too_short", "2 words", id="t1", instruction="Hi there")
    assert row == {"id": "t1", "instruction": "Hi there", "step": "rules", "reason": "too_short", "detail": "2 words"}


STAGE_CODE = sorted((ROOT / "stages").rglob("*.py"))


def test_every_stage_counts_drops_under_one_key_and_no_counter_is_written_by_hand():
    """`dropped_by_reason` is the only `*_by_reason` of drops (a client's `failed_by_reason` counts failed
    calls, not dropped rows); no `d.get(k, 0) + 1` counters and no `count()` helper."""
    bad = []
    for path in STAGE_CODE:
        text = path.read_text()
        for n, line in enumerate(text.splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{n}"
            for key in re.findall(r"[\"'](\w+_by_reason)[\"']", line):
                if key not in (DROPPED, "failed_by_reason"):
                    bad.append(f"{where}: {key}")
            if re.search(r"\.get\([^()]*,\s*0\)\s*\+\s*1\b", line) or re.search(r"\bdef count\(", line):
                bad.append(f"{where}: a hand-written counter")
    assert not bad, "\n".join(bad)


def test_drop_rows_use_step_reason_detail_not_the_old_columns():
    """The drop shards of generate, filter, select and ingest share the columns `step`, `reason`, `detail`."""
    bad = [f"{p.relative_to(ROOT)}:{n}" for p in STAGE_CODE for n, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"[\"'](error|raw|select_reason)[\"']\s*:", line) and "drop" in line]
    assert not bad, bad
