"""Setting a test project's params: `set_keys(section, cls, **values)` writes each value at its place in a
params.yaml section, a flat name that moved (`cls.MOVED`, e.g. generate's `model`) at its new place
(`teacher.model`), so a test says `model="o4-mini", concurrency=1` and gets `teacher.model`, `api.concurrency`."""

from __future__ import annotations


def set_keys(section: dict, cls, **values) -> dict:
    """`section` (a params.yaml section as a dict) with `values` set in place; a mapping value is merged into
    a mapping already there (a nested section), anything else replaces. Returns `section`."""
    moved = getattr(cls, "MOVED", {})
    for name, value in values.items():
        *parents, leaf = moved.get(name, name).split(".")
        here = section
        for p in parents:
            here = here.setdefault(p, {})
        old = here.get(leaf)
        here[leaf] = {**old, **value} if isinstance(value, dict) and isinstance(old, dict) else value
    return section
