"""One contract for the generate methods, distilabel's way (`steps/tasks/self_instruct.py`: each task
declares its inputs and outputs, and has one prompt builder and one parser).

Each method is a module of `stages/lib/generation/` with

    run(client, inputs: Inputs, params) -> Generated(rows, drops, steps)
    EXTRA_COLUMNS: {column: polars type}   # what its rows add to generate's task schema

`client` is anything with `ask(prompts, sampling, form) -> [record | None]` (the model client of
`stages.lib.llm.client`; None: failed this run, or waiting in a Batch job); `inputs` is what the stage
read once for every method; `params` is the method's own params section. `rows` are task rows, `drops`
the rows given up with `step`, `reason` and `detail` (`stages.lib.stats.drop_row`), and `steps` each
step's metrics, each with its `dropped_by_reason`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from stages.lib.llm.types import Sampling


@dataclass
class Inputs:
    """What generate reads once and hands to whichever method runs."""

    seeds: list[dict]
    """The seed tasks (`data/seeds`), in order."""
    num_requests: int
    """How many first requests the method makes (generate.num_requests)."""
    sampling: Sampling
    """The teacher's sampling params."""
    form: str
    """`completion` or `chat` (generate.teacher.prompt_form)."""
    seed: int
    """Seeds every random choice a method makes."""
    system_prompt: str = ""
    """Chat form: the system message of answer requests (generate.teacher.system_prompt)."""
    teacher_model: str = ""
    """The teacher's model name or folder (magpie's tokenizer when none is given)."""
    rules: Any = None
    """filter's rule params, for self-instruct's bootstrap (`stages.lib.text.rules.RuleParams`)."""
    bootstrap: Any = None
    """Self-instruct's params, for the methods that can start from its bootstrap step."""


class Generated(NamedTuple):
    """What a method returns."""

    rows: list[dict]
    drops: list[dict]
    steps: dict[str, dict]
