"""Typed params: each stage reads its own `params.yaml` section through `load_params` (every value
checked and converted against its dataclass annotation, nested sections included), and `run_main`
answers `python -m stages.<name> --help` from the dataclass's field docstrings before anything runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import types
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stages.lib.errors import StageError
from stages.lib.progress import log

PARAMS_FILE = "params.yaml"
T = TypeVar("T")



def load_params(cls: type[T], section: str, path: str | os.PathLike = PARAMS_FILE, only_own_keys: bool = False) -> T:
    """Build the dataclass `cls` from one top-level section of `params.yaml`.

    Every value is checked and converted against its field's annotation (`convert`), nested
    sections included; unknown keys are an error (a typo in `dvc exp run -S` must not be
    ignored); missing keys take the dataclass default; `__post_init__` checks the values.
    `only_own_keys`: read just `cls`'s fields from a section that another stage owns (that stage
    checks the rest), e.g. generate reading filter's rule params.
    """
    path = Path(path)
    data = read_params_file(path)
    if section not in data:
        raise StageError(f"{path}: no '{section}' section")
    values = data[section] or {}
    if only_own_keys and isinstance(values, dict):
        values = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cls)}}
    try:
        return params_from_dict(cls, values, where=section)
    except StageError as e:
        raise StageError(f"{path}: {e}") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping key given twice (plain YAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_params_file(path: Path) -> dict:
    """The top-level mapping of a params file; every problem (missing, not UTF-8, bad YAML, a duplicated key,
    not a mapping) is one line naming the file (and line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StageError(f"{path}: not found (run from the project root)") from None
    except UnicodeDecodeError as e:
        raise StageError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise StageError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise StageError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a mapping of sections, got {type(data).__name__} {str(data)[:40]!r}")
    return data


def params_from_dict(cls: type[T], values: Any, where: str = "params") -> T:
    """`cls(**values)` after checking and converting every value against its annotation.

    Errors are one line naming the dotted key, e.g. `train.learning_rate: expected float, got 'fast'`.
    A key listed in the class's `MOVED` ({old key: new dotted key under the section, or "removed: why"})
    fails with one line naming its new place, e.g. `generate.model: moved to generate.teacher.model`.
    """
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise StageError(f"{where}: expected a mapping of {cls.__name__} keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    moved = getattr(cls, "MOVED", {})  # old key -> its new place under `where`, or why it went
    for k in sorted(set(values) & set(moved)):
        new = moved[k]
        raise StageError(f"{where}.{k}: {new}" if new.startswith("removed") else f"{where}.{k}: moved to {where}.{new}")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise StageError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise StageError(f"{where}.{missing[0]}: required")
    hints = field_types(cls)
    typed = {k: convert(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**typed)
    except StageError:
        raise
    except (TypeError, ValueError) as e:
        raise StageError(f"{where}: {e}") from None


def field_types(cls) -> dict[str, Any]:
    """The resolved annotation of every field of a dataclass (string annotations evaluated)."""
    import typing

    return typing.get_type_hints(cls)


def convert_fields(obj, where: str) -> None:
    """Convert an instance's fields in place (for dataclasses built in code with plain dicts for their
    nested sections, e.g. `IngestParams(sources={...})`); call it first in `__post_init__`."""
    for name, hint in field_types(type(obj)).items():
        if name in {f.name for f in dataclasses.fields(obj)}:
            setattr(obj, name, convert(getattr(obj, name), hint, f"{where}.{name}"))


_INT = re.compile(r"[+-]?\d+")


def type_name(hint: Any) -> str:
    """A short readable name of an annotation: `float`, `list[str]`, `str | None`, `one of ('a', 'b')`."""
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return f"one of {args}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def convert(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against the annotation `hint` and converted where YAML or `dvc exp run -S`
    gives a string for a number: "2e-5" and "2e-05" become 2e-05 for a float, "3" becomes 3 for an
    int, "true"/"false" a bool. Handles Optional / unions, Literal choices, list[X], dict[str, X]
    and nested dataclasses (a mapping becomes the dataclass). A wrong type raises a one-line
    StageError naming the key `where`, the expected type and the value."""
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def bad() -> StageError:
        return StageError(f"{where}: expected {type_name(hint)}, got {value!r}")

    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return convert(value, a, where)
            except StageError:
                pass
        raise bad()
    if origin is typing.Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise StageError(f"{where}: expected one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return params_from_dict(hint, value, where)
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise bad()
        if not args:
            return dict(value)
        return {convert(k, args[0], f"{where}"): convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise bad()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            return int(value.strip())
        raise bad()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise bad()
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad()
    if isinstance(hint, type) and not isinstance(value, hint):
        raise bad()
    return value


# ---------------------------------------------------------------- --help


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal that follows it in the source)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            docs[a.target.id] = inspect.cleandoc(b.value.value)
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            docs = {**field_docs(base), **docs}
    return docs


def params_help(cls, prefix: str, default: Any = None) -> list[str]:
    """One entry per param (nested sections flattened to dotted keys): `key: type = default` and its doc."""
    import textwrap
    import typing

    lines = []
    default = default if default is not None else cls()
    docs, hints = field_docs(cls), field_types(cls)
    for f in dataclasses.fields(cls):
        hint, value = hints[f.name], getattr(default, f.name, dataclasses.MISSING)
        key = f"{prefix}.{f.name}"
        shown = "(required)" if value is dataclasses.MISSING else f"= {_yaml_value(value)}"
        if dataclasses.is_dataclass(hint):
            shown = "(a section: its keys follow)"
        lines.append(f"  {key}: {type_name(hint)} {shown}")
        lines += [textwrap.indent(line, "      ") for line in (docs.get(f.name) or "").splitlines()]
        if dataclasses.is_dataclass(hint):
            lines += params_help(hint, key, value)
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
            lines += _required_first(typing.get_args(hint)[1], f"{key}.<name>")
    return lines


def _required_first(cls, prefix: str) -> list[str]:
    """Help of a dataclass that may have required fields (no default instance to show)."""
    import textwrap

    lines = []
    docs, hints = field_docs(cls), field_types(cls)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            shown = f"= {_yaml_value(f.default)}"
        elif f.default_factory is not dataclasses.MISSING:
            shown = f"= {_yaml_value(f.default_factory())}"
        else:
            shown = "(required)"
        lines.append(f"  {prefix}.{f.name}: {type_name(hints[f.name])} {shown}")
        lines += [textwrap.indent(line, "      ") for line in (docs.get(f.name) or "").splitlines()]
    return lines


def _yaml_value(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    elif isinstance(value, dict):
        value = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in value.items()}
    return json.dumps(value, ensure_ascii=False)


def stage_help(doc: str | None, params: type | None, section: str | None) -> str:
    """What `python -m stages.<name> --help` prints: the module docstring, then every param."""
    out = [(doc or "").strip(), ""]
    if params is not None and section:
        out += [f"Params: params.yaml section `{section}` (override: dvc exp run -S {section}.KEY=VALUE)", ""]
        out += params_help(params, section)
    return "\n".join(out).rstrip() + "\n"


def run_main(fn, params: type | None = None, section: str | None = None) -> None:
    """Run a stage's main(); a StageError prints one clean line and exits 1.

    `-h` / `--help` prints the running module's docstring and every param of `params` (the
    dataclass of params.yaml section `section`: types, defaults, docs) and exits 0 before
    anything runs or is written. (A tool without params answers `--help` with its argparse.)
    """
    if params is not None and any(a in ("-h", "--help") for a in sys.argv[1:]):
        module = sys.modules.get(getattr(fn, "__module__", "__main__")) or sys.modules["__main__"]
        sys.stdout.write(stage_help(module.__doc__, params, section))
        sys.exit(0)
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
    except OSError as e:  # e.g. ENOSPC: one line naming the folder, not a traceback from deep inside pyarrow
        where = Path(e.filename).parent if e.filename else "a file"
        log(f"ERROR: {where}: {e.strerror or e} (errno {e.errno})")
        sys.exit(1)


def set_threads(n: int = 0) -> None:
    """Use every core for torch on CPU unless `n` says otherwise."""
    import torch

    torch.set_num_threads(n or os.cpu_count() or 1)
