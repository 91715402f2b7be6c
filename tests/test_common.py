"""Plumbing: dvc.yaml lists every module a stage imports; params are checked; writes are atomic."""

from __future__ import annotations

import ast
from dataclasses import dataclass

import polars as pl
import pytest
import yaml

from stages.lib.common import StageError, atomic_dir, load_params, read_shards, write_shards
from tests.conftest import ROOT


def module_file(module: str) -> str:
    """The file of a `stages.*` module or package, relative to the repository ('stages/lib/__init__.py')."""
    path = module.replace(".", "/")
    return f"{path}/__init__.py" if (ROOT / path).is_dir() else f"{path}.py"


def direct_imports(module: str) -> set[str]:
    """The `stages.*` modules one module imports (`from stages.lib import x` names the module x when it is one)."""
    tree = ast.parse((ROOT / module_file(module)).read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names
                    if (ROOT / node.module.replace(".", "/") / f"{a.name}.py").is_file()}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("stages.")}
    return out


def stage_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """Every `stages.*` module that `module` imports, transitively (module names like 'stages.lib.llm.local')."""
    seen = seen if seen is not None else set()
    for n in direct_imports(module):
        if n not in seen:
            seen.add(n)
            stage_imports(n, seen)
    return seen


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(st: dict) -> str:
    return st["cmd"].split("-m ")[1].split()[0]


# params sections a stage reads besides its own: the one student setting (stages/lib/student.py)
SHARED_PARAMS = {"tokenize": ["student"], "train": ["student"], "evaluate": ["student"], "report": ["student"]}


def test_dvc_yaml_lists_every_imported_module_of_each_stage():
    for name, st in dvc_stages().items():
        module = stage_module(st)
        needed = {module_file(m) for m in stage_imports(module) | {module}}
        needed = {f for f in needed if not f.endswith("__init__.py") or (ROOT / f).stat().st_size}
        missing = needed - set(st["deps"])
        assert not missing, f"stage {name}: dvc.yaml deps miss {sorted(missing)}"
        listed = {d for d in st["deps"] if d.startswith("stages/")}
        assert not listed - needed, f"stage {name}: dvc.yaml lists code it does not import: {sorted(listed - needed)}"
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        # each stage reads its own section, and those in SHARED_PARAMS besides
        assert st["params"] == [name, *SHARED_PARAMS.get(name, [])] and name in params, name


def test_stages_folder_holds_exactly_the_dvc_stages():
    """`ls stages/`: one module per dvc.yaml stage, the shared `lib/` and the hand-run `tools/`."""
    modules = {stage_module(st) for st in dvc_stages().values()}
    top = {p.stem for p in (ROOT / "stages").glob("*.py") if p.name != "__init__.py"}
    assert {f"stages.{m}" for m in top} == modules
    assert {p.name for p in (ROOT / "stages").iterdir() if p.is_dir() and p.name != "__pycache__"} == {"lib", "tools"}


def all_modules(folder: str) -> list[str]:
    return [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in sorted((ROOT / folder).rglob("*.py"))
            if p.name != "__init__.py"]


def test_a_stage_imports_no_other_stage_and_shared_code_imports_no_stage():
    stage_modules = {stage_module(st) for st in dvc_stages().values()}
    for module in sorted(stage_modules):
        other = {m for m in direct_imports(module) if m in stage_modules or m.startswith("stages.tools")}
        assert not other, f"{module} imports {sorted(other)}: move what they share to stages/lib"
    for module in all_modules("stages/lib"):
        bad = {m for m in direct_imports(module) if not m.startswith("stages.lib")}
        assert not bad, f"shared module {module} imports {sorted(bad)}: shared code imports no stage or tool"
    for module in all_modules("stages/tools"):
        bad = {m for m in direct_imports(module) if m in stage_modules}
        assert not bad, f"tool {module} imports the stage {sorted(bad)}: import from stages/lib instead"


@dataclass
class P:
    size: int = 3
    """A number."""
    name: str = "x"

    def __post_init__(self):
        if self.size < 0:
            raise ValueError("size: must be >= 0")


def test_params_unknown_key_and_bad_value(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("s:\n  size: 5\n")
    assert load_params(P, "s", f) == P(size=5)
    f.write_text("s:\n  sise: 5\n")
    with pytest.raises(StageError, match=r"unknown key\(s\) \['sise'\]"):
        load_params(P, "s", f)
    f.write_text("s:\n  size: -1\n")
    with pytest.raises(StageError, match="size: must be >= 0"):
        load_params(P, "s", f)
    with pytest.raises(StageError, match="no 't' section"):
        load_params(P, "t", f)


def test_every_stage_params_default_matches_params_yaml():
    """The defaults in the dataclasses and in params.yaml are the same build."""
    import importlib

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, cls in [("seeds", "SeedsParams"), ("teacher_model", "TeacherModelParams"), ("generate", "GenerateParams"),
                         ("filter", "FilterParams"), ("tokenize", "TokenizeParams"), ("train", "TrainParams"),
                         ("evaluate", "EvaluateParams"), ("report", "ReportParams")]:
        klass = getattr(importlib.import_module(f"stages.{section}"), cls)
        assert load_params(klass, section, ROOT / "params.yaml") == klass(), section
        assert set(params[section]) == set(klass.__dataclass_fields__), section
    from stages.lib.student import StudentParams, load_student

    assert load_student(ROOT / "params.yaml") == StudentParams() and set(params["student"]) == {"model"}


def test_atomic_dir_keeps_the_old_output_on_a_crash(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("crash")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind


def test_shards_are_fixed_size_and_byte_identical(tmp_path):
    df = pl.DataFrame({"i": list(range(25)), "s": [f"row {i}" for i in range(25)]})
    paths = write_shards(df, tmp_path / "a", "part", rows_per_shard=10)
    assert [pl.read_parquet(p).height for p in paths] == [10, 10, 5]
    again = write_shards(df, tmp_path / "b", "part", rows_per_shard=10)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert read_shards(tmp_path / "a").equals(df)
    empty = write_shards(df.clear(), tmp_path / "c", "part")
    assert len(empty) == 1 and pl.read_parquet(empty[0]).schema == df.schema
