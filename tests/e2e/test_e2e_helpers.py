"""tests/support/e2e.py's helpers: an interrupted command leaves no process behind; a project copy is
independent of its source and keeps its hardlinks."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.support.e2e import copy_project, sh


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_interrupted_command_kills_its_children_too(tmp_path):
    """As when pytest-timeout fires during `dvc repro`: the grandchild (the stage) dies with it."""
    pidfile = tmp_path / "pid"

    def interrupt(signum, frame):
        raise TimeoutError("interrupted")

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(TimeoutError):
            sh(tmp_path, "bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), f"the grandchild {pid} outlived the interrupted command"


def test_sh_returns_output_and_fails_loudly(tmp_path):
    assert sh(tmp_path, "bash", "-c", "echo out; echo err >&2").stdout == "out\n"
    assert sh(tmp_path, "bash", "-c", "exit 3", check=False).returncode == 3
    with pytest.raises(AssertionError, match="failed \\(3\\)"):
        sh(tmp_path, "bash", "-c", "exit 3")


def test_copy_project_keeps_hardlinks_inside_and_shares_nothing(tmp_path):
    src = tmp_path / "src"
    (src / "cache").mkdir(parents=True)
    (src / "cache" / "obj").write_bytes(b"weights")
    os.chmod(src / "cache" / "obj", 0o444)
    os.link(src / "cache" / "obj", src / "model.bin")  # as DVC links a workspace file to its cache
    (src / "link").symlink_to("model.bin")
    dst = copy_project(src, tmp_path / "dst")
    assert (dst / "model.bin").stat().st_ino == (dst / "cache" / "obj").stat().st_ino
    assert (dst / "model.bin").stat().st_nlink == 2 and (src / "model.bin").stat().st_nlink == 2
    assert (dst / "model.bin").stat().st_ino != (src / "model.bin").stat().st_ino
    assert (dst / "link").is_symlink() and (dst / "link").read_bytes() == b"weights"
    assert (dst / "cache" / "obj").stat().st_mode & 0o777 == 0o444
