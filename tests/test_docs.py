"""Text that cannot drift from the code: every file path, `stages.x` module and `section.key` param the
README, docs/ or a comment or docstring in stages/ and benchmarks/ names exists; the pipeline page shows
every dvc.yaml stage; the generation page names every method; only one page says what a cache key covers."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import typing
from pathlib import Path

import pytest
import yaml

from stages.generate import METHODS
from tests.support.tiny import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = sorted(p for d in ("stages", "benchmarks") for p in (ROOT / d).rglob("*.py"))
TEXTS = DOCS + CODE
SECTIONS = ("seeds", "teacher_model", "prune", "generate", "filter", "select", "ingest", "tokenize", "capture", "train",
            "evaluate", "report", "student")

PATH = re.compile(r"(?<![\w./-])((?:stages|tests|benchmarks|configs|seeds|docs)/[\w./-]*[\w/])")
MODULE = re.compile(r"(?<![\w./-])(stages(?:\.\w+)+)")
PARAM = re.compile(r"`((?:%s)(?:\.[\w-]+)+)" % "|".join(SECTIONS))
USER_FILES = ("data/", "models/", "seeds/corpora/", "seeds/eval/", "seeds/prompts/", "seeds/self_instruct_seeds")
NOT_A_PARAM = (".py", ".json", ".yaml", ".md", ".csv", ".parquet")


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def names(pattern: re.Pattern, texts=TEXTS):
    """(file, line number, name) for every match of `pattern`'s group 1."""
    for path in texts:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in pattern.finditer(line):
                yield rel(path), n, m.group(1)


def test_every_named_path_exists():
    bad = []
    for where, n, name in names(PATH):
        name = name.rstrip(".")
        if any(c in name for c in "*{<") or "/.." in name:
            continue
        # not repository paths: what a stage writes, a placeholder (NAME), a file the user brings into
        # seeds/corpora, seeds/eval or seeds/prompts (the docs say where to put it)
        if name.startswith(USER_FILES) or re.search(r"my_|/new_|example|[A-Z]{3,}\.", name):
            continue
        if not (ROOT / name).exists() and not (ROOT / name.split("::")[0]).exists():
            bad.append(f"{where}:{n}: {name}")
    assert not bad, "paths named in text that do not exist:\n" + "\n".join(bad)


def resolves(dotted: str) -> bool:
    """`stages.lib.io` or `stages.lib.io.atomic_dir`: the longest module prefix exists and holds the rest."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        mod = ".".join(parts[:i])
        path = ROOT / Path(*parts[:i])
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            obj = importlib.import_module(mod)
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
    return False


def test_every_named_module_exists():
    bad = [f"{where}:{n}: {name}" for where, n, name in names(MODULE) if not resolves(name.rstrip("."))]
    assert not bad, "stages.* modules named in text that do not exist:\n" + "\n".join(bad)


def params_classes() -> dict[str, type]:
    """{section: its dataclass}, read from each stage's `run_main(main, Params, "section")` call."""
    out = {}
    for path in sorted((ROOT / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "run_main" and len(node.args) == 3:
                module = importlib.import_module(f"stages.{path.stem}")
                out[node.args[2].value] = getattr(module, node.args[1].id)
    from stages.lib.student import StudentParams

    out["student"] = StudentParams
    return out


def param_exists(cls: type, keys: list[str]) -> bool:
    """Does `a.b.c` name a field under dataclass `cls` (a dict field's keys are free, then its value type)?"""
    hint: typing.Any = cls
    while keys:
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            fields = typing.get_type_hints(hint)
            if keys[0] not in fields:
                return False
            hint, keys = fields[keys[0]], keys[1:]
        elif origin is dict or hint is dict:
            args = typing.get_args(hint)
            hint, keys = (args[1] if args else typing.Any), keys[1:]
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            hint = next((a for a in typing.get_args(hint) if a is not type(None)), typing.Any)
        else:
            return hint is typing.Any
    return True


def line_of(where: str, n: int) -> str:
    return (ROOT / where).read_text(encoding="utf-8").splitlines()[n - 1]


def test_every_named_param_exists():
    classes = params_classes()
    assert set(classes) == set(SECTIONS), sorted(classes)
    bad = []
    for where, n, name in names(PARAM):
        name = name.rstrip(".")
        if name.endswith(NOT_A_PARAM):
            continue
        section, *keys = name.split(".")
        old = keys and keys[0] in getattr(classes[section], "MOVED", {})
        if old and re.search(r"moved|removed|old|before", line_of(where, n)):
            continue  # an old key, named as old: params.py fails on it with one line naming its new place
        if not param_exists(classes[section], keys):
            bad.append(f"{where}:{n}: {name}")
    assert not bad, "params named in text that no params dataclass declares:\n" + "\n".join(bad)


@pytest.mark.parametrize("text, found", [
    ("set `train.mixed_precision: auto`", "train.mixed_precision"),  # docs/training.md named this once
    ("see `stages/lib/common.py`", "stages/lib/common.py"),
    ("`stages.lib.common.log`", "stages.lib.common.log"),  # common.py was split
    ("`stages.lib.io.no_such_function`", "stages.lib.io.no_such_function"),
])
def test_the_checks_find_what_they_look_for(tmp_path, text, found):
    """The three patterns catch the kinds of drift the checks exist for, and the checks reject each name."""
    f = tmp_path / "page.md"
    f.write_text(text + "\n")
    got = [name for pattern in (PATH, MODULE, PARAM) for _, _, name in
           ((w, n, x) for w, n, x in ((None, 1, m.group(1)) for m in pattern.finditer(text)))]
    assert found in got
    if found.startswith("train."):
        assert not param_exists(params_classes()["train"], found.split(".")[1:])
        assert param_exists(params_classes()["train"], ["dtype"])
    elif "/" in found:
        assert not (ROOT / found).exists()
    else:
        assert not resolves(found)


def dvc_graph() -> set[tuple[str, str]]:
    """(upstream, downstream) for every dvc.yaml stage that reads another's output (outs, metrics, plots)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    made = {str(o if isinstance(o, str) else next(iter(o))): name for name, st in stages.items()
            for kind in ("outs", "metrics", "plots") for o in st.get(kind, [])}
    return {(made[d], name) for name, st in stages.items() for d in st.get("deps", []) if d in made}


def test_the_pipeline_page_shows_every_stage_and_the_graph_of_dvc_yaml():
    page = (ROOT / "docs/pipeline.md").read_text()
    flowchart = page.split("```mermaid")[1].split("```")[0]
    arrows = {tuple(x.strip().split(" --> ")) for x in flowchart.strip().splitlines()[1:]}
    for name in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]:
        assert f"| `{name}` |" in page, f"docs/pipeline.md: the stage table has no {name}"
    assert arrows == dvc_graph(), (f"docs/pipeline.md's flowchart differs from dvc.yaml: missing "
                                   f"{sorted(dvc_graph() - arrows)}, not in dvc.yaml {sorted(arrows - dvc_graph())}")


NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}


def test_the_generation_page_names_every_method_and_counts_them_right():
    page = (ROOT / "docs/generation.md").read_text()
    for m in METHODS:
        assert f"`{m}`" in page, f"docs/generation.md does not name method {m}"
    for where, n, line in [(p, i, x) for p in (ROOT / "docs/generation.md", ROOT / "docs/pipeline.md",
                                               ROOT / "stages/generate.py")
                           for i, x in enumerate(p.read_text().splitlines(), 1)]:
        for word in re.findall(r"\b(two|three|four|five|six|seven) (?:ways|methods)\b", line, re.I):
            assert word.lower() == NUMBERS[len(METHODS)], \
                f"{rel(where)}:{n}: says {word} methods, there are {len(METHODS)}"


def test_only_the_cache_page_says_what_a_cache_key_covers():
    """What a key is made of is written once (docs/teacher-cache.md), so no other page can contradict it."""
    claim = re.compile(r"cache key[^.]{0,40}\b(covers|includes|is made of|hashes|is the hash of)\b", re.I)
    bad = [f"{rel(p)}" for p in DOCS if p.name != "teacher-cache.md" and claim.search(p.read_text().replace("\n", " "))]
    assert not bad, f"these pages say what a cache key covers; link to docs/teacher-cache.md instead: {bad}"


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_and_anchor_resolves():
    bad = []
    for where, n, target in names(LINK, DOCS):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        page = (ROOT / where).parent / file if file else ROOT / where
        if not page.exists():
            bad.append(f"{where}:{n}: {target} (no such file)")
        elif anchor and page.suffix == ".md":
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}
            if anchor not in anchors:
                bad.append(f"{where}:{n}: {target} (no heading with that anchor)")
    assert not bad, "links that go nowhere:\n" + "\n".join(bad)


# ---------------------------------------------------------------- every documented `-S` runs as written

SET = re.compile(r"(?:^|\s)(?:-S|--set-param)\s+('[^']*'|\"[^\"]*\"|[^\s`'\"]+)")
PLACEHOLDER = re.compile(r"\b(?:section\.key|[a-z_]+\.key)=value\b|KEY=VALUE")
SHELL_VARS = {"$t": "4"}  # docs/selection.md's threshold loop
AFTER_AN_EDIT = {"ingest.mixture=all"}  # docs/generation.md: after the params.yaml block it shows (a mixture `all`)


def documented_overrides(texts=DOCS):
    """(file:line, [overrides]) for every command the README and docs/ show: a code line (with its `\\`
    continuations) or an inline code span, so one command's `-S` are applied together, as DVC does."""
    for path in texts:
        lines = path.read_text(encoding="utf-8").splitlines()
        n = 0
        while n < len(lines):
            start, line = n + 1, lines[n]
            while line.endswith("\\") and n + 1 < len(lines):
                n += 1
                line = line[:-1] + " " + lines[n]
            n += 1
            spans = re.findall(r"`([^`]*)`", line) if "`" in line and "```" not in line else [line]
            for span in spans:
                found = []
                for m in SET.finditer(span):
                    value = m.group(1)
                    if value[0] in "'\"":
                        value = value[1:-1]
                    for var, sub in SHELL_VARS.items():
                        value = value.replace(var, sub)
                    found.append(value)
                if found and not any(PLACEHOLDER.search(v) for v in found):
                    yield f"{rel(path)}:{start}", found


def apply_as_dvc_does(params_file: Path, overrides: list[str]) -> list[dict]:
    """What `dvc exp run -S ...` writes into params.yaml, one result per point of a sweep (`a=1,2`)."""
    from dvc.utils.hydra import apply_overrides, get_hydra_sweeps

    original = params_file.read_text(encoding="utf-8")
    results = []
    for point in get_hydra_sweeps({str(params_file): overrides}):
        params_file.write_text(original, encoding="utf-8")
        apply_overrides(params_file, point[str(params_file)])
        results.append(yaml.safe_load(params_file.read_text(encoding="utf-8")))
    return results


def test_documented_overrides_are_found():
    found = dict(documented_overrides())
    assert len(found) >= 25, found
    every = [o for overrides in found.values() for o in overrides]
    for expected in ("select.prices={gpt-4o-mini: {input_per_million: 0.15, output_per_million: 0.6}}",
                     "select.policy.threshold=4", "train.lora_r=8,16,32", "evaluate.sets.stillhouse.limit=4",
                     "+generate.teacher.extra_body.reasoning_effort=low",
                     "generate.teacher.base_url=http://localhost:8000/v1"):
        assert expected in every, expected


@pytest.mark.parametrize("where, overrides", list(documented_overrides()),
                         ids=lambda x: x if isinstance(x, str) else None)
def test_every_documented_override_runs_as_written(tmp_path, where, overrides):
    """DVC's own parser (`dvc.utils.hydra`, what `dvc exp run -S` calls) accepts each documented command's
    overrides against params.yaml (struct mode: a key params.yaml lacks fails there unless written `+key`),
    and every section of the result still loads through the stages' typed params."""
    import shutil

    from dvc.exceptions import InvalidArgumentError

    from stages.lib.params import load_params
    from stages.lib.student import load_student

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    try:
        results = apply_as_dvc_does(params, overrides)
    except InvalidArgumentError as e:
        pytest.fail(f"{where}: dvc exp run -S {overrides}: {e}: {e.__cause__}")
    if set(overrides) <= AFTER_AN_EDIT:
        return  # DVC takes it; the stages need the page's own params.yaml
    for data in results:
        params.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        for section, cls in params_classes().items():
            if section == "student":
                load_student(params)
            else:
                load_params(cls, section, params)


def test_the_documented_comparison_of_two_experiments_prints_no_float_noise(tmp_path):
    """The README's two-experiment comparison, run on two experiments of a tiny DVC project whose param and metric
    go 0.7 -> 0.6: no `0.09999999999999998` (what `dvc exp diff` prints in its params' Change column)."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(x for x in readme.splitlines() if re.match(r"dvc \w+ diff strict lr1e-4", x))
    commands = [c.split() for c in line.split("#")[0].split("&&")]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def run(*cmd):
        if cmd[0] == "dvc":
            cmd = (sys.executable, "-m", "dvc", *cmd[1:])
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    (tmp_path / "params.yaml").write_text("filter:\n  rouge_threshold: 0.7\n")
    (tmp_path / "s.py").write_text("import json, yaml\njson.dump({'kept': yaml.safe_load(open('params.yaml'))"
                                   "['filter']['rouge_threshold']}, open('m.json', 'w'))\n")
    (tmp_path / "dvc.yaml").write_text(f"stages:\n  s:\n    cmd: {sys.executable} s.py\n    deps: [s.py]\n"
                                       "    params: [filter]\n    metrics: [m.json: {cache: false}]\n")
    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("dvc", "repro", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "init")
    run("dvc", "exp", "run", "-q", "-n", "strict", "-S", "filter.rouge_threshold=0.6")
    run("dvc", "exp", "run", "-q", "-n", "lr1e-4", "-S", "filter.rouge_threshold=0.7")
    out = "".join(run(*c) for c in commands)
    assert "0.6" in out and "0.7" in out and not re.search(r"\d\.\d*(9999|0000)\d", out), out
