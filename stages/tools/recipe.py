"""Apply a recipe (a named params overlay in configs/recipes/) to params.yaml, then run it.

    python -m stages.tools.recipe --list                 # the recipes
    python -m stages.tools.recipe alpaca-7b --dry-run    # show what would change
    python -m stages.tools.recipe alpaca-7b              # write it into params.yaml (then `dvc exp run`)
    python -m stages.tools.recipe alpaca-7b --run        # write it and run `dvc exp run` (args after `--` go along)

A recipe is a params.yaml overlay: sections and keys that params.yaml has (a key it does not have
is an error, so a recipe that no longer fits the code fails loudly, and tests/test_recipes.py
trains every recipe for two steps on a tiny model). The overlay is written into params.yaml in
place (comments kept, the file replaced atomically), with floats in YAML 1.1 form (`2.0e-05`):
PyYAML, which the stages read params with, takes `2e-05` for a string, and that is what
`dvc exp run -S train.learning_rate=2e-5` would write. Only the values the recipe changes are rewritten,
each where it stands. `git diff params.yaml` shows the change; `git checkout params.yaml` undoes it.

First it says what the recipe needs on this machine, with the `-S` overrides after `--` applied: the
OPENAI_API_KEY variable for an endpoint on api.openai.com, the GPUs its accelerate config launches on,
and access to a gated Hub model. `--run` does not start (and writes nothing) while one is missing,
unless `--force`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.lib.errors import StageError, check_plain_path
from stages.lib.params import run_main
from stages.lib.progress import log

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"


def load_recipe(name: str, folder: Path = RECIPES) -> dict:
    path = Path(name) if name.endswith(".yaml") else folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise StageError(f"recipe {name!r}: {path} not found; known: {known}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise StageError(f"{path}: expected sections of params (section: {{key: value}})")
    if "accelerate_config" in data.get("train", {}):
        try:
            check_plain_path(data["train"]["accelerate_config"], "train.accelerate_config")
        except ValueError as e:
            raise StageError(f"{path}: {e}") from None
    return data


def flatten(overlay: dict, params: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) pairs; every key must exist in `params` (the same nesting)."""
    out = []
    for k, v in overlay.items():
        key = f"{prefix}{k}"
        if not isinstance(params, dict) or k not in params:
            raise StageError(f"recipe key {key!r} is not in params.yaml")
        if isinstance(v, dict) and isinstance(params[k], dict):
            out += flatten(v, params[k], key + ".")
        else:
            out.append((key, v))
    return out


def apply(params: dict, overlay: dict) -> dict:
    """params.yaml with the recipe applied (a copy), as `dvc exp run -S` leaves it."""
    import copy

    out = copy.deepcopy(params)
    for key, v in flatten(overlay, params):
        *path, last = key.split(".")
        node = out
        for k in path:
            node = node[k]
        node[last] = v
    return out


def yaml11_float(representer, value: float):
    """2e-05 -> `2.0e-05` (a float to YAML 1.1 readers such as PyYAML, as well as to YAML 1.2 ones)."""
    text = repr(value).lower()
    if "e" in text and "." not in text:
        text = text.replace("e", ".0e", 1)
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def flow_text(value) -> str:
    """`value` as one line of YAML (flow style; floats in YAML 1.1 form, `2.0e-05`, as PyYAML writes them)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def value_spans(node: yaml.Node, prefix: str = "") -> dict[str, tuple[int, int, yaml.Node]]:
    """dotted key -> (start, end) character offsets of its value in the text `node` was composed from."""
    out = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = (v.start_mark.index, v.end_mark.index, v)
            out.update(value_spans(v, key + "."))
    return out


def edit_lines(text: str, changes: list[tuple[str, object, object]]) -> str | None:
    """`text` with only the changed values rewritten where they stand (the rest of each line, its comment and
    every other line kept byte for byte); None where a value cannot be replaced in place (a block collection)."""
    spans = value_spans(yaml.compose(text))
    edits = []
    for key, _, new in changes:
        start, end, node = spans[key]
        if not isinstance(node, yaml.ScalarNode) and not node.flow_style:
            return None
        edits.append((start, end, flow_text(new)))
    edited = text
    for start, end, new in sorted(edits, reverse=True):
        edited = edited[:start] + new + edited[end:]
    old_lines, new_lines = text.splitlines(keepends=True), edited.splitlines(keepends=True)
    if len(old_lines) != len(new_lines):
        return None
    return "".join(keep_comment_column(a, b) if a != b else b for a, b in zip(old_lines, new_lines))


COMMENT = re.compile(r"(\s+)(#.*)$", re.S)


def keep_comment_column(old: str, new: str) -> str:
    """`new` with its end-of-line comment moved back to the column it had in `old` (as far as the value allows)."""
    a, b = COMMENT.search(old), COMMENT.search(new)
    if not a or not b or a.group(2) != b.group(2):
        return new
    column = a.start(2)
    return new[:b.start()] + " " * max(1, column - b.start()) + b.group(2)


def write_recipe(params_path: str | Path, overlay: dict, dry_run: bool = False) -> list[tuple[str, object, object]]:
    """Apply `overlay` to the params file in place; (key, old, new) per change. Only the values that change are
    rewritten, each where it stands (a line keeps its layout and comment; every other line is left as it is);
    the result is read back and must equal params.yaml with the overlay applied, else (a block-style list or
    mapping replaced) the file is written by ruamel's round trip, which keeps comments and order."""
    from stages.lib.io import atomic_file

    path = Path(params_path)
    text = path.read_text(encoding="utf-8")
    params = yaml.safe_load(text)
    changes = [(key, old, v) for key, v in flatten(overlay, params) if (old := lookup(params, key)) != v]
    if not changes or dry_run:
        return changes
    edited = edit_lines(text, changes)
    if edited is None or yaml.safe_load(edited) != apply(params, overlay):
        edited = round_trip(text, overlay)
    with atomic_file(path) as f:
        f.write(edited)
    return changes


def lookup(params: dict, key: str):
    node = params
    for k in key.split("."):
        node = node[k]
    return node


def round_trip(text: str, overlay: dict) -> str:
    """The params text with `overlay` applied by ruamel.yaml (comments and order kept, layout not always)."""
    import io

    from ruamel.yaml import YAML

    rt = YAML()
    rt.representer.add_representer(float, yaml11_float)
    doc = rt.load(text)
    for key, v in flatten(overlay, doc):
        *parents, last = key.split(".")
        node = doc
        for k in parents:
            node = node[k]
        node[last] = v
    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()


# ---------------------------------------------------------------- what a recipe needs


GATED = ("meta-llama/", "mistralai/", "google/gemma")
"""Hub organisations whose models are gated: the licence is accepted on the model's page, then a token is used."""
ENDPOINTS = ("generate.teacher", "evaluate.teacher", "evaluate.judge", "select.judge")


@dataclass
class Need:
    """One thing a run of these params needs from this machine: met or not, and what to do when not."""

    what: str
    met: bool
    how: str = ""


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def hf_token() -> bool:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return True
    try:
        from huggingface_hub import get_token
    except ImportError:
        return False
    return bool(get_token())


def in_hf_cache(model: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(model, "config.json"), str)


def needs(params: dict, root: Path = RECIPES.parents[1]) -> list[Need]:
    """What a run of `params` needs here: OPENAI_API_KEY for an endpoint on api.openai.com, the GPUs its
    accelerate config launches on, and access to a gated Hub model. Asks no server."""
    out = []
    openai = [name for name in ENDPOINTS if (e := lookup_or(params, name)) and e.get("backend") == "openai"
              and not e.get("base_url") and (name != "select.judge"
                                             or params.get("select", {}).get("method") in ("rating", "both"))]
    if openai:
        out.append(Need(f"OPENAI_API_KEY (api.openai.com for {', '.join(openai)})",
                        bool((os.environ.get("OPENAI_API_KEY") or "").strip()),
                        "export OPENAI_API_KEY=... (never in params.yaml)"))
    train = params.get("train", {})
    config = train.get("accelerate_config", "configs/accelerate/single.yaml")
    try:
        launch = yaml.safe_load((root / config).read_text(encoding="utf-8")) or {}
    except OSError:
        launch = {}
    machines = max(1, int(launch.get("num_machines", 1) or 1))
    per_machine = int(launch.get("num_processes", 1) or 1) // machines
    bf16 = train.get("dtype") == "bfloat16" or train.get("method") == "qlora"
    wanted = per_machine if launch.get("distributed_type", "NO") != "NO" else (1 if bf16 else 0)
    if wanted:
        have = gpu_count()
        why = (f"{config}: num_processes {launch.get('num_processes')}" + (f" on {machines} machines" if machines > 1
               else "") if per_machine > 1 else f"train.dtype {train.get('dtype')}, train.method {train.get('method')}")
        how = (f"run it on a machine with {wanted} (or change train.accelerate_config)" if wanted > 1
               else "run it on a machine with one (train.dtype float32 and a small student.model train on the CPU)")
        out.append(Need(f"{wanted} CUDA GPU{'s' if wanted > 1 else ''} ({why}); this machine has {have}",
                        have >= wanted, how))
    student = params.get("student", {}).get("model", "")
    if student.startswith(GATED) and not os.path.isdir(student):
        met = in_hf_cache(student) or hf_token()
        out.append(Need(f"access to the gated {student} (student.model)", met,
                        f"accept its licence on https://huggingface.co/{student}, then `hf auth login` or HF_TOKEN"))
    return out


def lookup_or(params: dict, key: str):
    try:
        return lookup(params, key)
    except (KeyError, TypeError):
        return None


def set_params(extra: list[str]) -> list[str]:
    """The `-S` / `--set-param` overrides among `dvc exp run` arguments."""
    out, args = [], iter(extra)
    for a in args:
        if a in ("-S", "--set-param"):
            out.append(next(args, ""))
        elif a.startswith("--set-param="):
            out.append(a.split("=", 1)[1])
        elif a.startswith("-S") and len(a) > 2:
            out.append(a[2:])
    return out


def with_overrides(params_text: str, overrides: list[str]) -> dict:
    """The params after `dvc exp run -S ...` (DVC's own parser, on a copy; a sweep's first point)."""
    import tempfile

    if not overrides:
        return yaml.safe_load(params_text)
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides, get_hydra_sweeps

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        copy.write_text(params_text, encoding="utf-8")
        try:
            apply_overrides(copy, get_hydra_sweeps({str(copy): overrides})[0][str(copy)])
        except InvalidArgumentError as e:
            raise StageError(f"dvc exp run -S {' '.join(overrides)}: {e.__cause__ or e}".splitlines()[0]) from None
        return yaml.safe_load(copy.read_text(encoding="utf-8"))


def preflight(name: str, params: dict) -> list[Need]:
    """Print what the recipe needs here, one line each; the needs not met."""
    found = needs(params)
    if found:
        print(f"recipe {name} needs:")
    for n in found:
        print(f"  {'ok     ' if n.met else 'MISSING'}  {n.what}" + ("" if n.met else f": {n.how}"))
    return [n for n in found if not n.met]


def summary(path: Path, width: int = 100) -> str:
    """`name: ` and the first sentence of a recipe's header comment, whole, wrapped under the name."""
    import textwrap

    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#") or not line.lstrip("# ").strip():
            break
        header.append(line.lstrip("# ").strip())
    text = " ".join(header)
    m = re.search(r"(?<=[.!?])\s", text)
    first = text[:m.start()] if m else text
    return textwrap.fill(f"{path.stem}: {first}", width=width, subsequent_indent="    ")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.tools.recipe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?", help="a name in configs/recipes (alpaca-7b, lora-24gb) or a .yaml path")
    ap.add_argument("--list", action="store_true", help="list the recipes")
    ap.add_argument("--dry-run", action="store_true", help="show the changes, write nothing")
    ap.add_argument("--run", action="store_true", help="then run `dvc exp run` (arguments after `--` are passed on)")
    ap.add_argument("--force", action="store_true", help="with --run: run even when a need is not met here")
    ap.add_argument("--params", default="params.yaml", help="the params file to change (default: params.yaml)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # after `--`: more `dvc exp run` arguments
    a = ap.parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])
    a.extra = extra
    if a.list or not a.recipe:
        for p in sorted(RECIPES.glob("*.yaml")):
            print(summary(p))
        return
    recipe = load_recipe(a.recipe)
    text = Path(a.params).read_text(encoding="utf-8")
    unmet = preflight(a.recipe, with_overrides(yaml.safe_dump(apply(yaml.safe_load(text), recipe)),
                                               set_params(a.extra)))
    if a.run and unmet and not a.force:
        raise StageError(f"recipe {a.recipe}: not run, {len(unmet)} of its needs not met here (MISSING above); "
                         f"{a.params} is unchanged (--force runs anyway)")
    changes = write_recipe(a.params, recipe, a.dry_run)
    for key, old, new in changes:
        print(f"{key}: {old!r} -> {new!r}")
    print(f"recipe {a.recipe}: {len(changes)} params {'would change' if a.dry_run else 'changed in ' + a.params}")
    if a.run and not a.dry_run:
        args = ["dvc", "exp", "run", *a.extra]
        log(f"recipe {a.recipe}: {shlex.join(args)}")
        raise SystemExit(subprocess.call(args))


if __name__ == "__main__":
    run_main(main)
