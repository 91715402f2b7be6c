"""Strange text never crashes a reader: deeply nested JSON is one `file:line` problem (seeds, corpus JSONL and
JSON arrays), and ingest's "Copy code" pattern is linear (checked on its shape and on equivalence, not on time)."""

from __future__ import annotations

import json
import re

import pytest

from stages.lib.errors import StageError
from stages.lib.formats import Malformed, records
from stages.lib.text.clean import MAX_JSON_DEPTH, json_depth, load_json
from stages.seeds import parse_seed_file

DEEP = "[" * 100_000


def test_load_json_turns_deep_nesting_into_a_decode_error():
    for text in (DEEP, "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)):
        with pytest.raises(json.JSONDecodeError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
            load_json(text)
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert json_depth(load_json(ok)) == MAX_JSON_DEPTH
    assert json_depth({"a": [1, {"b": []}]}) == 4 and json_depth("x") == 0


def test_a_deep_line_in_seeds_is_one_problem_naming_file_and_line(tmp_path):
    path = tmp_path / "seeds.jsonl"
    good = {"id": "s1", "name": "n", "instruction": "Do it.", "instances": [{"input": "", "output": "ok"}],
            "is_classification": False}
    data = (json.dumps(good) + "\n" + DEEP + "\n").encode()
    recs, errors = parse_seed_file(path, data, {})
    assert errors == [f"{path}:2: line: invalid JSON (nested deeper than {MAX_JSON_DEPTH} levels at column 1)"]


def test_a_deep_record_in_a_corpus_is_dropped_as_malformed_and_the_others_kept(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"conversations": []}\n' + DEEP + '\n{"conversations": []}\n')
    out = list(records(path, stats={"repaired": 0, "too_long": 0}))
    assert [where for where, _ in out] == [":1", ":2", ":3"]
    assert isinstance(out[1][1], Malformed) and "nested deeper" in str(out[1][1])
    arr = tmp_path / "c.json"
    arr.write_text(DEEP)
    with pytest.raises(StageError, match=f"{arr}:1: invalid JSON: nested deeper"):
        list(records(arr, stats={"repaired": 0, "too_long": 0}))


def _repeats(pattern: str):
    """(op, item) of every repeat in a compiled pattern's parse tree."""
    import re._parser as p
    out, stack = [], [p.parse(pattern)]
    while stack:
        for op, av in stack.pop():
            if op in (p.MAX_REPEAT, p.MIN_REPEAT, p.POSSESSIVE_REPEAT):
                out.append((op, av[2]))
                stack.append(av[2])
            elif op is p.SUBPATTERN:
                stack.append(av[3])
    return out


def test_the_copy_code_pattern_has_no_backtracking_whitespace_run():
    import re._parser as p

    from stages.ingest import COPY_CODE
    space = [(p.IN, [(p.CATEGORY, p.CATEGORY_SPACE)])]
    ops = [op for op, item in _repeats(COPY_CODE.pattern) if list(item) == space]
    # the two runs around the language name are possessive; only the run after "Copy code" (no retry) is not
    assert ops.count(p.POSSESSIVE_REPEAT) == 2 and ops.count(p.MAX_REPEAT) == 1


@pytest.mark.parametrize("text", ["```python Copy code\nprint(1)", "```\n\nCopy code\nx", "```pythonCopy code x",
                                  "```CopyCopy code y", "``` " + " " * 2000 + "no copy", "```Copy code", "a ``` b"])
def test_the_copy_code_pattern_matches_as_before(text):
    from stages.ingest import COPY_CODE
    old = re.compile(r"```\s*(\w*?)\s*Copy code\s*")
    assert COPY_CODE.sub(lambda m: f"```{m.group(1)}\n", text) == old.sub(lambda m: f"```{m.group(1)}\n", text)
