"""The committed .dvc/config: a default remote usable on one machine, links instead of copies, no secrets."""

from __future__ import annotations

from pathlib import Path

from configobj import ConfigObj

from tests.support.tiny import ROOT

# options of DVC's remotes that hold credentials: they belong in the environment or .dvc/config.local
SECRETS = {"access_key_id", "secret_access_key", "session_token", "password", "passphrase", "connection_string",
           "account_key", "sas_token", "client_secret", "token", "credentialpath", "keyfile", "gdrive_client_secret",
           "custom_auth_header"}


def config() -> ConfigObj:
    return ConfigObj(str(ROOT / ".dvc" / "config"))


def test_default_remote_is_a_directory_beside_the_repository():
    cfg = config()
    name = cfg["core"]["remote"]
    url = cfg[f'remote "{name}"']["url"]
    assert "://" not in url and not Path(url).is_absolute()
    assert (ROOT / ".dvc" / url).resolve() == ROOT.parent.resolve() / "stillhouse-remote"


def test_outputs_are_linked_to_the_cache_not_copied():
    types = [t.strip() for t in config()["cache"]["type"].split(",")]
    assert types[0] == "hardlink" and "reflink" not in types, types  # see the comment in .dvc/config


def test_no_credentials_are_committed():
    cfg = config()
    for section in (s for s in cfg.sections if s.startswith("remote ")):
        assert not SECRETS & set(cfg[section]), f".dvc/config [{section}]: credentials go in the environment or --local"
    assert "/config.local" in (ROOT / ".dvc" / ".gitignore").read_text().split()  # where --local writes


def test_what_dvc_plots_writes_is_git_ignored():
    """`dvc plots show` / `dvc plots diff` write dvc_plots/index.html: `git status` must not offer it."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    r = subprocess.run(["git", "check-ignore", "-q", "--no-index", "dvc_plots/index.html"], cwd=ROOT)
    assert r.returncode == 0, "dvc_plots/ is not in .gitignore"
