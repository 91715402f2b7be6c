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
`dvc exp run -S train.learning_rate=2e-5` would write. `git diff params.yaml` shows the change;
`git checkout params.yaml` undoes it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
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


def write_recipe(params_path: str | Path, overlay: dict, dry_run: bool = False) -> list[tuple[str, object, object]]:
    """Apply `overlay` to the params file in place (comments and order kept); (key, old, new) per change."""
    import io

    from ruamel.yaml import YAML

    from stages.lib.io import atomic_file

    rt = YAML()
    rt.representer.add_representer(float, yaml11_float)
    path = Path(params_path)
    doc = rt.load(path.read_text(encoding="utf-8"))
    changes = []
    for key, v in flatten(overlay, doc):
        *parents, last = key.split(".")
        node = doc
        for k in parents:
            node = node[k]
        if node[last] != v:
            changes.append((key, node[last], v))
            node[last] = v
    if changes and not dry_run:
        buf = io.StringIO()
        rt.dump(doc, buf)
        with atomic_file(path) as f:
            f.write(buf.getvalue())
    return changes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.tools.recipe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?", help="a name in configs/recipes (alpaca-7b, lora-24gb) or a .yaml path")
    ap.add_argument("--list", action="store_true", help="list the recipes")
    ap.add_argument("--dry-run", action="store_true", help="show the changes, write nothing")
    ap.add_argument("--run", action="store_true", help="then run `dvc exp run` (arguments after `--` are passed on)")
    ap.add_argument("--params", default="params.yaml", help="the params file to change (default: params.yaml)")
    ap.add_argument("extra", nargs="*", help="after `--`: more `dvc exp run` arguments")
    a = ap.parse_args(argv)
    if a.list or not a.recipe:
        for p in sorted(RECIPES.glob("*.yaml")):
            print(f"{p.stem}: {p.read_text().splitlines()[0].lstrip('# ')}")
        return
    changes = write_recipe(a.params, load_recipe(a.recipe), a.dry_run)
    for key, old, new in changes:
        print(f"{key}: {old!r} -> {new!r}")
    print(f"recipe {a.recipe}: {len(changes)} params {'would change' if a.dry_run else 'changed in ' + a.params}")
    if a.run and not a.dry_run:
        args = ["dvc", "exp", "run", *a.extra]
        log(f"recipe {a.recipe}: {shlex.join(args)}")
        raise SystemExit(subprocess.call(args))


if __name__ == "__main__":
    run_main(main)
