"""The two ways a stage refuses input: `StageError` (bad input or params; the stage prints one line
and exits 1, nothing written) and `check` (a dataclass's `__post_init__` test, raised as ValueError
and reported by `params_from_dict` with the param's name)."""

from __future__ import annotations


class StageError(Exception):
    """Bad input or bad params: the stage stops with this message and nothing is written."""



def check(cond: bool, msg: str) -> None:
    """`__post_init__` helper: raise ValueError(msg) unless cond."""
    if not cond:
        raise ValueError(msg)
