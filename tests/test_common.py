"""Plumbing: dvc.yaml lists every module a stage imports; params are checked; writes are atomic."""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import Literal

import polars as pl
import pytest
import yaml

from stages.lib import paths
from stages.lib.errors import StageError
from stages.lib.io import atomic_dir, read_shards, write_shards
from stages.lib.params import load_params, params_from_dict
from tests.support.tiny import ROOT


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
        # a stage reads its own section, plus only the other keys it is allowed to read (declared in dvc.yaml)
        assert st["params"][0] == name and name in params, name
        assert st["params"][1:] == list(SHARED_PARAMS.get(name, ())), name
        for key in st["params"][1:]:
            section, _, field = key.partition(".")
            assert section in params and (not field or field in params[section]), \
                f"stage {name}: {key} not in params.yaml"


SHARED_PARAMS = {"generate": ("filter.min_words", "filter.max_words", "filter.blacklist"),
                 # the one student setting (stages/lib/student.py)
                 "tokenize": ("student",), "train": ("student",), "evaluate": ("student",), "report": ("student",),
                 # IFD scores with the student's base model and its training prompt template
                 "select": ("student", "tokenize.template"),
                 # capture runs only for the objectives that use it
                 "capture": ("train.objective",)}
"""Keys (or whole sections) of params.yaml that a stage reads besides its own section, in the order dvc.yaml
lists them after the stage's own section. Each must be one the stage really reads (tests below)."""


def test_generate_reads_exactly_the_declared_filter_keys():
    """generate loads `RuleParams` from the `filter` section: its fields are the keys dvc.yaml declares."""
    from dataclasses import fields

    from stages.lib.text.rules import RuleParams

    assert {f"filter.{f.name}" for f in fields(RuleParams)} == set(SHARED_PARAMS["generate"])
    assert "load_params(RuleParams, \"filter\", only_own_keys=True)" in (ROOT / "stages/generate.py").read_text()


def test_select_reads_exactly_the_declared_tokenize_key():
    from dataclasses import fields

    from stages.select import TemplateParam

    assert {f"tokenize.{f.name}" for f in fields(TemplateParam)} == set(SHARED_PARAMS["select"][1:])
    assert "load_params(TemplateParam, \"tokenize\", only_own_keys=True)" in (ROOT / "stages/select.py").read_text()


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
    for section, cls in [("seeds", "SeedsParams"), ("teacher_model", "TeacherModelParams"),
                         ("generate", "GenerateParams"), ("filter", "FilterParams"), ("select", "SelectParams"),
                         ("ingest", "IngestParams"), ("tokenize", "TokenizeParams"), ("train", "TrainParams"),
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


# ---------------------------------------------------------------- paths between stages


def test_dvc_yaml_outputs_and_data_deps_match_paths_py():
    """Each stage's outs and metrics in dvc.yaml are what paths.py says it writes; each data dep is
    another stage's output (paths.INPUTS) or a file under seeds/ (or the accelerate config)."""
    stages = dvc_stages()
    assert set(stages) == set(paths.OUTPUTS) == set(paths.INPUTS)
    written = {p: name for name, outs in paths.OUTPUTS.items() for p in outs}
    for name, st in stages.items():
        outs = [o if isinstance(o, str) else next(iter(o)) for o in st.get("outs", []) + st.get("metrics", [])]
        assert sorted(outs) == sorted(paths.OUTPUTS[name]), name
        data = [d for d in st["deps"] if not d.startswith(("stages/", "seeds/", "${"))]
        assert sorted(data) == sorted(paths.INPUTS[name]), name
        for d in data:
            assert d in written and written[d] != name, f"stage {name}: dep {d} is no other stage's output"
    top = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert {p for m in top["metrics"] for p in [m]} <= {f"{paths.TRAIN_LOG}/metrics.json"}
    # no stage reads or writes a path between stages through a param any more
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in params.items():
        assert not {k for k in values if k.endswith("_dir")}, section


def test_stages_and_tools_name_no_path_between_stages_but_through_paths_py():
    """A literal "data/..." / "models/..." / "metrics/..." in stage or tool code (outside docstrings and
    dataclass defaults of model params) would be a second source of truth."""
    import re

    # defaults of model params (`student.model`, `select.judge.model`, `model`)
    allowed = {paths.TEACHER, paths.PRUNED, paths.STUDENT}
    literal = re.compile(r'^[^#]*?[^`\w/]"((?:data|models|metrics)/[\w./-]+)"')
    for f in sorted((ROOT / "stages").rglob("*.py")):
        if f.name == "paths.py":
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            m = literal.match(line)
            assert not m or m.group(1) in allowed, f"{f.relative_to(ROOT)}:{n}: {m.group(1)} (use stages.lib.paths)"


# ---------------------------------------------------------------- typed params


@dataclass
class Inner:
    rate: float = 0.5
    """A rate."""
    names: list[str] = dataclasses.field(default_factory=lambda: ["a"])


@dataclass
class Typed:
    lr: float = 2e-4
    """Learning rate."""
    steps: int = 3
    enabled: bool = False
    base: str | None = None
    mode: Literal["x", "y"] = "x"
    inner: Inner = dataclasses.field(default_factory=Inner)
    named: dict[str, Inner] = dataclasses.field(default_factory=dict)
    weights: dict[str, float] = dataclasses.field(default_factory=dict)


def load_yaml(tmp_path, text: str):
    f = tmp_path / "params.yaml"
    f.write_text(text)
    return load_params(Typed, "t", f)


def test_params_are_converted_to_their_annotated_types(tmp_path):
    p = load_yaml(tmp_path, """t:
  lr: 2e-5            # PyYAML reads this as the string "2e-5"
  steps: "7"
  enabled: true
  base: null
  mode: y
  inner: {rate: 1e-3, names: [b, c]}
  named: {one: {rate: "2"}, two: {}}
  weights: {a: 1, b: 0.5}
""")
    assert yaml.safe_load("x: 2e-5")["x"] == "2e-5"  # the reason for all this
    assert p.lr == 2e-05 and type(p.lr) is float
    assert p.steps == 7 and type(p.steps) is int and p.enabled is True and p.base is None and p.mode == "y"
    assert p.inner == Inner(rate=0.001, names=["b", "c"])
    assert p.named == {"one": Inner(rate=2.0), "two": Inner()} and type(p.named["one"].rate) is float
    assert p.weights == {"a": 1.0, "b": 0.5} and type(p.weights["a"]) is float
    again = load_yaml(tmp_path, "t:\n  lr: 2e-05\n  enabled: 'false'\n")  # what `dvc exp run -S t.lr=2e-5` writes
    assert again.lr == 2e-05 and again.enabled is False
    assert load_yaml(tmp_path, "t: {}\n") == Typed()


@pytest.mark.parametrize("text, message", [
    ("lr: fast", "t.lr: expected float, got 'fast'"),
    ("steps: 2.5", "t.steps: expected int, got 2.5"),
    ("steps: '2.5'", "t.steps: expected int, got '2.5'"),
    ("steps: true", "t.steps: expected int, got True"),
    ("enabled: 1", "t.enabled: expected bool, got 1"),
    ("base: 3", "t.base: expected str | None, got 3"),
    ("mode: z", "t.mode: expected one of ['x', 'y'], got 'z'"),
    ("inner: {rate: slow}", "t.inner.rate: expected float, got 'slow'"),
    ("inner: {names: b}", "t.inner.names: expected list[str], got 'b'"),
    ("inner: {names: [b, 3]}", "t.inner.names[1]: expected str, got 3"),
    ("inner: {rat: 1}", "t.inner: unknown key(s) ['rat']; known: ['names', 'rate']"),
    ("named: {one: {rate: x}}", "t.named.one.rate: expected float, got 'x'"),
    ("named: [a]", "t.named: expected dict[str, Inner], got ['a']"),
    ("weights: {a: heavy}", "t.weights.a: expected float, got 'heavy'"),
])
def test_a_wrong_type_is_one_line_naming_key_type_and_value(tmp_path, text, message):
    with pytest.raises(StageError) as e:
        load_yaml(tmp_path, f"t:\n  {text}\n")
    assert str(e.value) == f"{tmp_path / 'params.yaml'}: {message}" and "\n" not in str(e.value)


def test_the_real_sections_convert_strings_and_name_the_key():
    from stages.evaluate import EvaluateParams
    from stages.generate import GenerateParams
    from stages.ingest import IngestParams
    from stages.train import TrainParams

    assert params_from_dict(TrainParams, {"learning_rate": "2e-5", "max_steps": "3"}, "train").learning_rate == 2e-05
    g = params_from_dict(GenerateParams, {"prices": {"m": {"input_per_million": "1e-1"}},
                                          "self_instruct": {"rouge_threshold": "0.5"}}, "generate")
    assert g.prices["m"].input_per_million == 0.1 and g.self_instruct.rouge_threshold == 0.5
    with pytest.raises(StageError, match=r"^generate\.responses\.n: expected int, got 'two'$"):
        params_from_dict(GenerateParams, {"responses": {"n": "two"}}, "generate")
    with pytest.raises(StageError, match=r"^ingest\.sources\.s\.format: expected one of"):
        params_from_dict(IngestParams, {"sources": {"s": {"format": "csv", "path": "x"}}, "mixtures": {"m": {"s": 1}},
                                        "mixture": "m"}, "ingest")
    with pytest.raises(StageError, match=r"^evaluate\.judge\.reasoning_budget: expected int, got 'lots'$"):
        params_from_dict(EvaluateParams, {"judge": {"backend": "openai", "reasoning_budget": "lots"}}, "evaluate")
    with pytest.raises(StageError, match=r"^evaluate\.sets\.x\.limit: expected int, got 'all'$"):
        params_from_dict(EvaluateParams, {"sets": {"x": {"path": "a", "limit": "all"}}}, "evaluate")


def test_dvc_exp_run_set_param_writes_a_string_that_loads_as_a_float(tmp_path):
    """`dvc exp run -S train.learning_rate=2e-5` (DVC itself, in a tiny git + DVC repo) writes `2e-05`,
    which PyYAML reads as a string; TrainParams loads it as the float 2e-05."""
    import os
    import shutil
    import subprocess
    import sys

    from stages.train import TrainParams

    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": params["train"]}, sort_keys=False))
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: python -c pass\n    params: [train]\n")

    def run(*cmd):
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr

    run(git, "init", "-q")
    dvc = [sys.executable, "-m", "dvc"]
    run(*dvc, "init", "-q")
    run(git, "add", "-A")
    run(git, "commit", "-qm", "init")
    run(*dvc, "exp", "run", "-q", "-S", "train.learning_rate=2e-5")
    written = (tmp_path / "params.yaml").read_text()
    assert "learning_rate: 2e-05" in written and yaml.safe_load(written)["train"]["learning_rate"] == "2e-05"
    p = load_params(TrainParams, "train", tmp_path / "params.yaml")
    assert p.learning_rate == 2e-05 and type(p.learning_rate) is float
    import torch

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=p.learning_rate)  # where a string failed
    assert opt.param_groups[0]["lr"] == 2e-05


# ---------------------------------------------------------------- --help


def help_targets() -> list[tuple[str, list[str]]]:
    """(module, names --help must print): each DVC stage with its params (nested ones dotted), each tool
    with its options."""
    import importlib

    out = []
    for name, st in dvc_stages().items():
        module = stage_module(st)
        mod = importlib.import_module(module)
        cls = next(v for k, v in vars(mod).items() if k.endswith("Params") and getattr(v, "__module__", "") == module
                   and k.lower().startswith(name.replace("_", "")))
        out.append((module, flat_params(cls, name)))
    out.append(("stages.tools.chat", ["--model", "--file", "--out", "--system", "--max-new-tokens", "--temperature"]))
    out.append(("stages.tools.export", ["--format", "--out", "--from", "--in"]))
    out.append(("stages.tools.recipe", ["--list", "--dry-run", "--run", "--params"]))
    out.append(("stages.tools.ifeval", ["--out", "--metrics", "--prompts", "--subset", "--write-prompts", "--partial"]))
    out.append(("stages.tools.mtbench", ["--judge-model", "--base-url", "--backend", "--cache", "--out", "--metrics",
                                         "--questions", "--references", "--judge-prompts", "--dry-run"]))
    out.append(("stages.tools.lcwinrate", ["--metrics", "--difficulty", "--force"]))
    out.append(("stages.tools.verify", ["--kind", "--out", "--force", "--mode", "--jobs", "--cpu-s", "--wall-s",
                                        "--memory-mb"]))
    return out


def flat_params(cls, prefix: str) -> list[str]:
    import typing

    names = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        names.append(f"{prefix}.{f.name}")
        if dataclasses.is_dataclass(hint):
            names += flat_params(hint, f"{prefix}.{f.name}")
    return names


def test_help_targets_cover_every_stage_and_tool():
    modules = {m for m, _ in help_targets()}
    assert {stage_module(st) for st in dvc_stages().values()} | {f"stages.tools.{m.rsplit('.', 1)[-1]}"
                                                                  for m in all_modules("stages/tools")} == modules


@pytest.mark.parametrize("module, names", help_targets(), ids=lambda x: x if isinstance(x, str) else "")
def test_help_prints_what_a_stage_does_and_its_params_and_runs_nothing(tmp_path, module, names):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": "sk-must-not-be-used"}
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import importlib

    doc = importlib.import_module(module).__doc__.strip()
    assert doc.splitlines()[0] in r.stdout
    missing = [n for n in names if n not in r.stdout]
    assert not missing, f"{module} --help does not name {missing}"
    assert list(tmp_path.iterdir()) == []  # nothing written (no params.yaml needed, no output made)
    if not module.startswith("stages.tools"):
        assert f"{names[0]}: " in r.stdout  # `key: type = default`


def test_no_test_module_imports_another_and_support_imports_no_test():
    """Shared test code lives in tests/support/ (fixtures in tests/conftest.py): a `test_*` module is never
    a library, so editing one test file cannot break another."""
    for path in sorted((ROOT / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                last = name.split(".")[-1]
                assert not (name.startswith("tests") and (last.startswith("test_") or last == "conftest")), \
                    f"{path.relative_to(ROOT)} imports {name}: move what it needs to tests/support/"


def test_a_missing_model_folder_is_one_line_naming_it_and_how_to_make_it(tmp_path, monkeypatch):
    """A model name that reads as a local folder but is not there is refused before transformers would take it for a
    hub id (a 70-line traceback offline, a Hub query online); a hub id and a folder that exists pass as given."""
    from stages.lib.paths import local_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "teacher").mkdir(parents=True)
    (tmp_path / "models" / "teacher" / "config.json").write_text("{}")
    with pytest.raises(StageError, match=r"^student\.model: models/student: model folder not found; make it with "
                                         r"`dvc pull models/student` \(from the remote\) or `dvc repro train`$"):
        local_model("models/student", "student.model")
    with pytest.raises(StageError, match=r"^student\.model: models/studnet: model folder not found; a local model "
                                         r"folder must exist \(a hub id is org/name\); models/ has: teacher$"):
        local_model("models/studnet", "student.model")
    (tmp_path / "models" / "student").mkdir()  # what DVC leaves after removing a failed stage's output
    with pytest.raises(StageError, match=r"^--model: models/student: model folder is empty; make it with"):
        local_model("models/student", "--model")
    for name in ("models/teacher", "meta-llama/Llama-3.1-8B", "gpt2", str(tmp_path / "models" / "teacher")):
        assert local_model(name) == name
    for name in ("./x", "/no/such/model", "~/no-such-model", "a/b/c"):
        with pytest.raises(StageError, match="model folder not found"):
            local_model(name)
