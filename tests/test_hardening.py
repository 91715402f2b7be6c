"""Issue 22's plumbing findings: crash leftovers of `atomic_dir`, outputs that honour the umask, and errors that
are one line naming the file (a truncated shard, a broken / non-UTF-8 / scalar / duplicated-key params file,
a full disk)."""

from __future__ import annotations

import errno
import os
import stat
import sys
from dataclasses import dataclass

import polars as pl
import pytest

from stages.lib.errors import StageError
from stages.lib.io import atomic_dir, read_shards, write_json, write_shards
from stages.lib.params import load_params, run_main


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_stale_tmp_and_old_leftovers_are_removed_on_entry(tmp_path):
    out = tmp_path / "seeds"
    out.mkdir()
    (out / "part-00000.parquet").write_text("old")
    (tmp_path / ".seeds.tmp-6jmy7o8c").mkdir()
    (tmp_path / ".seeds.tmp-6jmy7o8c" / "half.parquet").write_text("partial")
    (tmp_path / ".seeds.old-4242").mkdir()
    (tmp_path / ".other.tmp-x").mkdir()  # another output's temp folder is not ours to touch
    with atomic_dir(out) as tmp:
        (tmp / "part-00000.parquet").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x", "seeds"]
    assert (out / "part-00000.parquet").read_text() == "new"


def test_a_kill_between_the_two_renames_gets_the_old_output_back(tmp_path):
    out = tmp_path / "seeds"
    old = tmp_path / ".seeds.old-4242"  # what a SIGKILL after the first os.replace leaves
    old.mkdir()
    (old / "part-00000.parquet").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out):
        raise RuntimeError("this run fails too")
    assert (out / "part-00000.parquet").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seeds"]


def test_leftover_names_are_git_ignored():
    import subprocess

    from tests.support.tiny import ROOT
    for name in ("data/.seeds.tmp-6jmy7o8c", "data/.seeds.old-4242", "metrics/.eval.json.tmp-abc"):
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", name], cwd=ROOT)
        assert r.returncode == 0, f"{name} is not ignored"


def test_outputs_honour_the_umask(tmp_path, umask_022):
    with atomic_dir(tmp_path / "seeds") as tmp:
        write_shards(pl.DataFrame({"a": [1]}), tmp)
    write_json(tmp_path / "m.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "seeds").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "seeds" / "part-00000.parquet").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644


def test_a_truncated_shard_is_one_line_naming_it(tmp_path):
    write_shards(pl.DataFrame({"a": list(range(100))}), tmp_path)
    shard = tmp_path / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(StageError) as e:
        read_shards(tmp_path)
    assert str(shard) in str(e.value) and "\n" not in str(e.value)


@dataclass
class P:
    n: int = 1


@pytest.mark.parametrize("body, problem", [
    (b"p:\n  n: [1\n", r"params.yaml:\d+: invalid YAML"),
    (b"p:\n  n: 1\n  n: 2\n", r"params.yaml:3: invalid YAML: duplicate key 'n'"),
    (b"p:\n  n: 1\np:\n  n: 2\n", r"params.yaml:3: invalid YAML: duplicate key 'p'"),
    (b"p:\n  n: \xff\n", r"params.yaml: not UTF-8"),
    (b"just a scalar\n", r"params.yaml: expected a mapping of sections, got str"),
])
def test_a_broken_params_file_is_one_line_naming_it(tmp_path, body, problem):
    path = tmp_path / "params.yaml"
    path.write_bytes(body)
    with pytest.raises(StageError, match=problem) as e:
        load_params(P, "p", path)
    assert "\n" not in str(e.value)


def test_a_full_disk_is_one_line_naming_the_folder(tmp_path, monkeypatch, capsys):
    def full():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "seeds" / "part-00000.parquet"))

    monkeypatch.setattr(sys, "argv", ["stage"])
    with pytest.raises(SystemExit) as e:
        run_main(full)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{tmp_path / 'seeds'}: No space left on device" in err


def test_chat_refuses_an_existing_non_empty_out_before_loading_a_model(tmp_path):
    from stages.tools.chat import main
    out = tmp_path / "answers.jsonl"
    out.write_text('{"prompt": "mine"}\n')
    with pytest.raises(SystemExit, match="exists and is not empty; pass --force"):
        main(["--model", str(tmp_path / "no-such-model"), "--file", str(tmp_path / "p.txt"), "--out", str(out)])
    assert out.read_text() == '{"prompt": "mine"}\n'


@pytest.mark.parametrize("value", ["single.yaml; echo PWNED > x #", "a b.yaml", "$(id).yaml", "'q'.yaml",
                                   "-x.yaml", "/etc/accelerate.yaml", "a|b", "a&b", "`id`", "a\nb"])
def test_accelerate_config_must_be_a_plain_relative_path(tmp_path, value):
    from stages.lib.params import params_from_dict
    from stages.tools.recipe import load_recipe
    from stages.train import TrainParams
    with pytest.raises(StageError, match="train: accelerate_config: expected a plain relative path"):
        params_from_dict(TrainParams, {"accelerate_config": value}, where="train")
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(yaml_dump({"train": {"accelerate_config": value}}))
    with pytest.raises(StageError, match=f"{recipe}: train.accelerate_config: expected a plain relative path"):
        load_recipe(str(recipe))


def test_the_shipped_accelerate_configs_are_plain_paths():
    from stages.lib.params import params_from_dict
    from stages.tools.recipe import load_recipe
    from stages.train import TrainParams
    for name in ("single", "ddp", "fsdp", "multinode"):
        assert params_from_dict(TrainParams, {"accelerate_config": f"configs/accelerate/{name}.yaml"}, "train")
    assert load_recipe("alpaca-7b")["train"]["accelerate_config"] == "configs/accelerate/fsdp.yaml"


def yaml_dump(obj) -> str:
    import yaml
    return yaml.safe_dump(obj)
