"""The two ways a stage refuses input: `StageError` (bad input or params; the stage prints one line
and exits 1, nothing written) and `check` (a dataclass's `__post_init__` test, raised as ValueError
and reported by `params_from_dict` with the param's name), and `check_plain_path` for a param that
`dvc.yaml` pastes into a shell command."""

from __future__ import annotations

import re

PLAIN_PATH = re.compile(r"[\w.][\w./-]*")  # no spaces, quotes, ;|&$`<>(){}*?~ or a leading - or /


class StageError(Exception):
    """Bad input or bad params: the stage stops with this message and nothing is written."""


def check(cond: bool, msg: str) -> None:
    """`__post_init__` helper: raise ValueError(msg) unless cond."""
    if not cond:
        raise ValueError(msg)


def check_plain_path(value: str, name: str) -> None:
    """A param that `dvc.yaml` substitutes into a shell `cmd` (`${train.accelerate_config}`) must be a plain
    relative path: word characters, `.`, `/` and `-` only, so no value can add a shell word or command."""
    check(isinstance(value, str) and PLAIN_PATH.fullmatch(value) is not None,
          f"{name}: expected a plain relative path (letters, digits, _ . / -), got {value!r}")
