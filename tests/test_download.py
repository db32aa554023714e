"""`data.fetch` against local HTTP mirrors serving the real files: verified, atomic, retried, never re-downloaded."""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import idx_bytes, left_behind

from fmnist import data
from fmnist.errors import DownloadError
from fmnist.files import FILE_MODE

NAMES = tuple(data.CONTENT_MD5)  # the order fetch downloads them in
FIRST = NAMES[0]  # train-images-idx3-ubyte: failing it stops fetch before anything else is downloaded
FETCH = {"retries": 1, "timeout": 5.0}


pytestmark = pytest.mark.usefixtures("no_proxy")  # conftest: reach the local mirrors directly


@pytest.fixture(scope="module")
def real_files(real_data_source) -> dict[str, bytes]:
    """The four real files as served upstream (gzipped), keyed by their name without `.gz`."""
    if real_data_source.format != "idx":
        pytest.skip("the real dataset here is in CSV form; the mirror needs the IDX files")
    files = {}
    for name in NAMES:
        path = data._idx_file(real_data_source.path, name)
        raw = path.read_bytes()
        files[name] = raw if raw[:2] == b"\x1f\x8b" else gzip.compress(raw, compresslevel=1)
    return files


class Mirror:
    """A local HTTP mirror. `modes` maps a file name (no `.gz`) to how it is served; `default` for the rest.

    Modes: ok, wrong (other plain bytes), wrong-gzip (a valid gzip of other IDX data), corrupt-gzip, error (500),
    truncate (full Content-Length, half the body, then close), chunked-truncate (chunked, cut inside a chunk).
    """

    def __init__(self, files: dict[str, bytes], modes: dict[str, str] | None = None, default: str = "ok"):
        self.files = files
        self.modes = modes or {}
        self.default = default
        self.requests: list[str] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):  # noqa: N802 (http.server's naming)
                mirror.requests.append(self.path)
                name = self.path.rsplit("/", 1)[-1].removesuffix(".gz")
                if name not in mirror.files:
                    self.send_error(404)
                    return
                mode = mirror.modes.get(name, mirror.default)
                body = mirror.files[name]
                if mode == "error":
                    self.send_error(500, "broken mirror")
                    return
                if mode == "wrong":
                    body = b"<html>this is not Fashion-MNIST</html>\n"
                elif mode == "wrong-gzip":
                    body = gzip.compress(idx_bytes(np.zeros(10, dtype=np.uint8)))
                elif mode == "corrupt-gzip":
                    body = b"\x1f\x8b" + b"not deflate data" * 64
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if mode == "chunked-truncate":
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"%x\r\n" % len(body) + body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "truncate":
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def requested(self, name: str) -> int:
        return sum(path.endswith(f"/{name}.gz") for path in self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def mirror(real_files):
    """A factory of local mirrors serving the real files; all are shut down after the test."""
    started: list[Mirror] = []

    def start(modes: dict[str, str] | None = None, default: str = "ok") -> Mirror:
        started.append(Mirror(real_files, modes, default))
        return started[-1]

    yield start
    for server in started:
        server.close()


# ----------------------------------------------------------------------------------------------- success
def test_fetch_downloads_all_four_then_loads_and_skips_them_next_time(mirror, tmp_path):
    server = mirror()
    dest = tmp_path / "dest"
    seen: dict[str, tuple[int, int | None]] = {}
    result = data.fetch(dest, mirrors=(server.url,), progress=lambda n, done, total: seen.__setitem__(n, (done, total)),
                        **FETCH)
    assert result == dest
    assert left_behind(dest) == sorted(f"{name}.gz" for name in NAMES)
    assert [server.requested(name) for name in NAMES] == [1, 1, 1, 1]
    for name in NAMES:  # a shared cache: readable like any file the user makes, not 0600 like a temporary file
        assert (dest / f"{name}.gz").stat().st_mode & 0o777 == FILE_MODE, name
    assert set(seen) == set(NAMES) and all(done == total for done, total in seen.values())

    (x_train, y_train), (x_test, y_test) = data.load_data(dest)  # verify=True
    assert x_train.shape == (60000, 28, 28) and y_test.shape == (10000,)
    assert data.locate_data(dest).origin == "argument"

    data.fetch(dest, mirrors=(server.url,), **FETCH)
    assert len(server.requests) == 4, "already verified files were downloaded again"


def test_only_missing_or_corrupt_files_are_downloaded(mirror, tmp_path, real_files):
    server = mirror()
    dest = tmp_path / "dest"
    dest.mkdir()
    for name in NAMES[:2]:
        (dest / f"{name}.gz").write_bytes(real_files[name])
    (dest / f"{NAMES[2]}.gz").write_bytes(b"\x1f\x8bcorrupt")  # corrupt: replaced
    # NAMES[3] is missing
    data.fetch(dest, mirrors=(server.url,), **FETCH)
    assert [server.requested(name) for name in NAMES] == [0, 0, 1, 1]
    assert left_behind(dest) == sorted(f"{name}.gz" for name in NAMES)
    assert (dest / f"{NAMES[2]}.gz").read_bytes() == real_files[NAMES[2]]


def test_second_mirror_rescues_a_broken_first(mirror, tmp_path):
    broken = mirror(default="truncate")
    good = mirror()
    dest = tmp_path / "dest"
    data.fetch(dest, mirrors=(broken.url, good.url), **FETCH)
    assert [broken.requested(name) for name in NAMES] == [1, 1, 1, 1]
    assert [good.requested(name) for name in NAMES] == [1, 1, 1, 1]
    assert left_behind(dest) == sorted(f"{name}.gz" for name in NAMES)
    for name in NAMES:
        assert data._md5_of_content(dest / f"{name}.gz") == data.CONTENT_MD5[name]


def test_download_fallback_of_locate_data_uses_env_mirrors(monkeypatch, mirror, tmp_path):
    """Nothing local: locate_data downloads into the (isolated) cache from $FMNIST_MIRROR, a comma list."""
    broken = mirror(default="error")
    good = mirror()
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("FMNIST_MIRROR", f" {broken.url} ,, {good.url}")
    source = data.locate_data()
    assert source == data.DataSource(data.cache_dir(), "download", "idx")
    assert left_behind(source.path) == sorted(f"{name}.gz" for name in NAMES)
    assert len(broken.requests) == 4 and len(good.requests) == 4


# ----------------------------------------------------------------------------------------------- failures
@pytest.mark.parametrize("mode", ["wrong", "wrong-gzip", "corrupt-gzip", "error"])
def test_wrong_content_raises_and_leaves_nothing(mirror, tmp_path, mode):
    server = mirror({FIRST: mode})
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError) as excinfo:
        data.fetch(dest, mirrors=(server.url,), **FETCH)
    message = str(excinfo.value)
    assert f"{FIRST}.gz" in message and "\n" not in message
    assert server.requested(FIRST) == 1
    assert left_behind(dest) == []  # no file for it, no .part temporaries


def test_wrong_content_late_keeps_the_good_files(mirror, tmp_path):
    last = NAMES[-1]
    server = mirror({last: "wrong"})
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match=last):
        data.fetch(dest, mirrors=(server.url,), **FETCH)
    assert left_behind(dest) == sorted(f"{name}.gz" for name in NAMES[:-1])


def test_connection_closed_halfway_raises_and_leaves_nothing(mirror, tmp_path):
    server = mirror({FIRST: "truncate"})
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match=rf"{FIRST}\.gz.*connection closed after \d+ of \d+ bytes"):
        data.fetch(dest, mirrors=(server.url,), **FETCH)
    assert left_behind(dest) == []


def test_retries_mean_attempts_per_mirror(mirror, tmp_path):
    server = mirror({FIRST: "error"})
    with pytest.raises(DownloadError, match="after 2 tries"):
        data.fetch(tmp_path / "dest", mirrors=(server.url,), retries=2, timeout=5.0)
    assert server.requested(FIRST) == 2


def test_unreachable_mirror_is_download_error(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens there now
    with pytest.raises(DownloadError):
        data.fetch(tmp_path / "dest", mirrors=(f"http://127.0.0.1:{port}",), **FETCH)
    assert left_behind(tmp_path / "dest") == []
def test_chunked_response_cut_short_is_download_error(mirror, tmp_path):
    server = mirror({FIRST: "chunked-truncate"})
    dest = tmp_path / "dest"
    try:
        with pytest.raises(DownloadError):
            data.fetch(dest, mirrors=(server.url,), **FETCH)
    finally:
        assert left_behind(dest) == []  # the .part file is removed either way
def test_mirror_without_scheme_is_dataset_error(tmp_path):
    with pytest.raises(DownloadError):
        data.fetch(tmp_path / "dest", mirrors=("example.invalid/mirror",), **FETCH)
