"""tests/support/reference_data.py: the table agrees with the data folder, verify finds every fault, and fetch
downloads, checks and places files (served from loopback HTTP and file://, so no internet is needed)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from tests.support import reference_data as rd
from tests.support.tiny import SHARED, shared


def ref(path: str, data: bytes, repo: str = "someone/data", commit: str = "a" * 40) -> rd.Ref:
    return rd.Ref(path, repo, commit, f"files/{Path(path).name}", len(data), hashlib.sha256(data).hexdigest(), "MIT")


def serve_layout(root: Path, files: dict[rd.Ref, bytes]) -> None:
    """Lay `files` out under `root` as raw.githubusercontent.com does: {repo}/{commit}/{source}."""
    for r, data in files.items():
        p = root / r.repo / r.commit / r.source
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


@pytest.fixture
def http_server(tmp_path):
    """A loopback HTTP server over tmp_path/www; yields (root folder, base url)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield www, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_table_is_the_data_folders_sha256sums():
    """Every file the folder's SHA256SUMS lists is in the table with the same digest, and no other."""
    sums = dict(reversed(line.split()) for line in shared("SHA256SUMS").read_text().splitlines())
    assert {r.path: r.sha256 for r in rd.FILES} == sums
    assert len({r.path for r in rd.FILES}) == len(rd.FILES)
    for r in rd.FILES:
        assert len(r.commit) == 40 and r.url().startswith(f"https://raw.githubusercontent.com/{r.repo}/{r.commit}/")


def test_verify_passes_on_the_reference_data():
    shared("SHA256SUMS")  # skips (and says so) without the data
    assert rd.problems(SHARED) == []
    assert rd.main(["verify", str(SHARED)]) == 0
    assert all((SHARED / r.path).stat().st_size == r.size for r in rd.FILES)


def test_verify_names_missing_and_changed_files(tmp_path, capsys):
    a, b = ref("x/a.json", b"[1, 2]\n"), ref("b.jsonl", b'{"k": 1}\n')
    (tmp_path / "x").mkdir()
    (tmp_path / "x/a.json").write_bytes(b"[1, 2]\n")
    assert rd.problems(tmp_path, (a, b)) == [f"{tmp_path / 'b.jsonl'}: missing"]
    (tmp_path / "b.jsonl").write_bytes(b'{"k": 2}\n')  # one byte differs
    [line] = rd.problems(tmp_path, (a, b))
    assert line.startswith(f"{tmp_path / 'b.jsonl'}: sha256 ") and f"expected {b.sha256}" in line
    assert rd.main(["verify", str(tmp_path)]) == 1  # the real table: nothing of it is here
    assert f"0 of {len(rd.FILES)} reference files verified" in capsys.readouterr().out


def test_fetch_over_http_downloads_checks_and_skips_good_files(tmp_path, http_server):
    www, url = http_server
    files = {ref("x/a.json", b"[1, 2]\n"): b"[1, 2]\n", ref("b.jsonl", b'{"k": 1}\n'): b'{"k": 1}\n'}
    serve_layout(www, files)
    dest = tmp_path / "data"
    assert rd.fetch(dest, url, tuple(files)) == ["x/a.json", "b.jsonl"]
    assert rd.problems(dest, tuple(files)) == []
    assert (dest / "x/a.json").read_bytes() == b"[1, 2]\n"
    assert rd.fetch(dest, url, tuple(files)) == []  # nothing missing or wrong: no download
    (dest / "b.jsonl").write_bytes(b"changed\n")
    assert rd.fetch(dest, url, tuple(files)) == ["b.jsonl"]
    assert (dest / "b.jsonl").read_bytes() == b'{"k": 1}\n'


def test_fetch_refuses_a_download_with_the_wrong_sha256(tmp_path, http_server):
    www, url = http_server
    want = ref("a.json", b"[1]\n")
    serve_layout(www, {want: b"[2]\n"})  # the server has other bytes than the table pins
    dest = tmp_path / "data"
    with pytest.raises(ValueError,
                       match=f"sha256 {hashlib.sha256(b'[2]' + bytes([10])).hexdigest()}, expected {want.sha256}"):
        rd.fetch(dest, url, (want,))
    assert list(dest.iterdir()) == []  # neither the file nor its temporary part is left


def test_fetch_a_missing_url_fails_cleanly(tmp_path, http_server):
    _, url = http_server
    dest = tmp_path / "data"
    with pytest.raises(OSError, match="404"):
        rd.fetch(dest, url, (ref("a.json", b"[1]\n"),))
    assert list(dest.iterdir()) == []


def test_fetch_command_rebuilds_the_whole_folder_from_a_mirror(tmp_path, http_server):
    """The real table, served from loopback HTTP laid out as GitHub's raw files are: `fetch` then
    `verify` gives a byte-identical folder; and from a file:// mirror too."""
    shared("SHA256SUMS")
    www, url = http_server
    serve_layout(www, {r: (SHARED / r.path).read_bytes() for r in rd.FILES})
    dest = tmp_path / "data"
    assert rd.main(["fetch", str(dest), "--base-url", url]) == 0
    assert all((dest / r.path).read_bytes() == (SHARED / r.path).read_bytes() for r in rd.FILES)
    dest2 = tmp_path / "data2"
    assert rd.main(["fetch", str(dest2), "--base-url", www.as_uri()]) == 0
    assert rd.problems(dest2) == []
    (www / rd.FILES[0].repo / rd.FILES[0].commit / rd.FILES[0].source).write_bytes(b"tampered\n")
    assert rd.main(["fetch", str(tmp_path / "data3"), "--base-url", url]) == 1
