"""Hostile dataset files and mirrors: every one is a one-line `DatasetError`, at a cost bounded by the caps.

A gzip bomb (a small .gz inflating to gigabytes) is read only as far as its IDX header promises, and a header that
promises more than a Fashion-MNIST file holds is refused unread; a mirror sending more than `MAX_DOWNLOAD_BYTES`
is cut off, leaving no partial file. Peak memory is measured in a child process, so the numbers are its own.
"""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import idx_bytes, left_behind

from fmnist import data
from fmnist.errors import DataFormatError, DownloadError

MiB = 1024 * 1024
FIRST = tuple(data.CONTENT_MD5)[0]  # train-images-idx3-ubyte: the file fetch downloads first


def _bomb(path: Path, promised: int, inflated_mib: int) -> Path:
    """An images file whose header promises `promised` images, followed by `inflated_mib` MiB of zeros, gzipped:
    a few hundred kilobytes on disk."""
    with gzip.open(path, "wb", compresslevel=6) as handle:
        handle.write(struct.pack(">IIII", data.IMAGES_MAGIC, promised, 28, 28))
        zeros = bytes(MiB)
        for _ in range(inflated_mib):
            handle.write(zeros)
    return path


def _read_in_child(path: Path) -> dict:
    """Read `path` as a split's images in a fresh interpreter (the path `load_data` takes); its error and how much
    its peak memory grew."""
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from fmnist import data\n"
        "from fmnist.errors import DatasetError\n"
        "from fmnist.hardware import peak_rss_mib\n"
        "before = peak_rss_mib()\n"
        "try:\n"
        "    data.read_idx_pair(Path(sys.argv[1]), Path(sys.argv[1]), verify=False)\n"
        "    error = None\n"
        "except DatasetError as caught:\n"
        "    error = str(caught)\n"
        "after = peak_rss_mib()\n"
        "print(json.dumps({'error': error, 'grew_kib': (after - before) * 1024}))\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# ----------------------------------------------------------------------------------------------- gzip bombs
def test_gzip_bomb_is_read_only_as_far_as_its_header_promises(tmp_path):
    """Before: `gzip.decompress` inflated the whole file (a 1 MB bomb of 1 GiB peaked at 2 GiB, 12 s)."""
    bomb = _bomb(tmp_path / "train-images-idx3-ubyte.gz", promised=10, inflated_mib=256)
    assert bomb.stat().st_size < 2 * MiB
    result = _read_in_child(bomb)
    assert "has data after the 7840 bytes" in result["error"] and "padded" in result["error"]
    assert result["grew_kib"] < 16 * 1024, f"peak memory grew by {result['grew_kib'] / 1024:.0f} MiB"


def test_header_promising_the_cap_costs_at_most_the_cap(tmp_path):
    """The worst a header within the cap can cost: its promised body (100,000 x 784 bytes, 78 MB), read once."""
    bomb = _bomb(tmp_path / "cap.gz", promised=data.MAX_IDX_IMAGES, inflated_mib=200)
    result = _read_in_child(bomb)
    assert "padded" in result["error"]
    assert result["grew_kib"] < (78 + 16) * 1024, f"peak memory grew by {result['grew_kib'] / 1024:.0f} MiB"


@pytest.mark.parametrize(("dims", "fragment"), [
    ((4_000_000_000, 28, 28), "header promises 4,000,000,000 images, more than the 100,000"),
    ((data.MAX_IDX_IMAGES + 1, 28, 28), "more than the 100,000 a Fashion-MNIST file holds"),
    ((10, 1000, 1000), "images are 1000x1000, expected 28x28"),
])
def test_header_beyond_the_caps_is_refused_before_the_body_is_read(tmp_path, dims, fragment):
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", data.IMAGES_MAGIC, *dims) + bytes(100)))
    started = time.perf_counter()
    with pytest.raises(DataFormatError) as caught:
        data.read_idx_bytes(path, data.IMAGES_MAGIC)
    assert time.perf_counter() - started < 1.0
    message = str(caught.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_labels_header_beyond_the_cap_is_refused(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(struct.pack(">II", data.LABELS_MAGIC, 2**32 - 1))
    with pytest.raises(DataFormatError, match="promises 4,294,967,295 labels, more than the 100,000"):
        data.read_idx_bytes(path, data.LABELS_MAGIC)


@pytest.mark.parametrize("packed", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize(("change", "fragment"), [(lambda b: b + b"\0", "padded"),
                                                  (lambda b: b[:-1], "truncated")], ids=["trailing", "short"])
def test_data_beyond_or_short_of_the_promise_is_a_clear_error(tmp_path, packed, change, fragment):
    payload = change(idx_bytes(np.zeros((3, 28, 28), np.uint8), data.IMAGES_MAGIC))
    path = tmp_path / "images"
    path.write_bytes(gzip.compress(payload) if packed else payload)
    with pytest.raises(DataFormatError) as caught:
        data.read_idx_bytes(path, data.IMAGES_MAGIC)
    assert fragment in str(caught.value) and "2352 bytes of data its header promises" in str(caught.value)


def test_a_good_file_reads_the_same_plain_or_gzipped(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    payload = idx_bytes(images, data.IMAGES_MAGIC)
    (tmp_path / "plain").write_bytes(payload)
    (tmp_path / "packed").write_bytes(gzip.compress(payload))
    assert bytes(data.read_idx_bytes(tmp_path / "plain", data.IMAGES_MAGIC)) == payload
    assert bytes(data.read_idx_bytes(tmp_path / "packed", data.IMAGES_MAGIC)) == payload


# ----------------------------------------------------------------------------------------------- downloads
def test_first_default_mirror_is_https():
    assert data.DEFAULT_MIRRORS[0].startswith("https://")
    assert all(mirror.startswith(("http://", "https://")) for mirror in data.DEFAULT_MIRRORS)


pytestmark = pytest.mark.usefixtures("no_proxy")  # conftest: reach the local mirrors directly


class HostileMirror:
    """A local mirror that misbehaves for every file. Modes: endless (zeros until the client hangs up, no
    Content-Length), huge-length (announces a terabyte, sends a little), bomb (a small gzip bomb)."""

    def __init__(self, mode: str, bomb: bytes = b""):
        self.sent = 0
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):  # noqa: N802 (http.server's naming)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if mode == "huge-length":
                    self.send_header("Content-Length", str(10**12))
                elif mode == "bomb":
                    self.send_header("Content-Length", str(len(bomb)))
                self.end_headers()
                try:
                    if mode == "bomb":
                        self.wfile.write(bomb)
                        return
                    chunk = bytes(MiB)
                    for _ in range(4 if mode == "huge-length" else 1024):  # at most 1 GiB, should the client not stop
                        self.wfile.write(chunk)
                        mirror.sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def hostile():
    started: list[HostileMirror] = []

    def start(mode: str, bomb: bytes = b"") -> HostileMirror:
        started.append(HostileMirror(mode, bomb))
        return started[-1]

    yield start
    for server in started:
        server.close()


def test_endless_download_is_stopped_at_the_cap_and_leaves_nothing(hostile, tmp_path):
    server = hostile("endless")
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError) as caught:
        data.fetch(dest, mirrors=(server.url,), retries=1, timeout=10.0)
    message = str(caught.value)
    assert f"{FIRST}.gz" in message and "more than the 64 MiB a dataset file can be" in message
    assert "\n" not in message
    assert left_behind(dest) == []  # no file, no .part temporary
    time.sleep(0.2)  # the server notices the closed connection
    assert server.sent < 200 * MiB, f"the client kept reading: {server.sent / MiB:.0f} MiB sent"


def test_announced_size_over_the_cap_is_refused_before_reading(hostile, tmp_path):
    server = hostile("huge-length")
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match="announced size of 1,000,000,000,000 bytes is more than the 64 MiB"):
        data.fetch(dest, mirrors=(server.url,), retries=1, timeout=10.0)
    assert left_behind(dest) == []


def test_a_smaller_cap_is_honoured_too(hostile, tmp_path):
    server = hostile("endless")
    with pytest.raises(DownloadError, match=r"stopped at [\d,]+ bytes\) is more than the 1 MiB"):
        data.fetch(tmp_path / "dest", mirrors=(server.url,), retries=1, timeout=10.0, max_bytes=MiB)
    assert left_behind(tmp_path / "dest") == []


def test_downloaded_gzip_bomb_is_refused_and_removed(hostile, tmp_path):
    bomb = _bomb(tmp_path / "bomb.gz", promised=10, inflated_mib=64).read_bytes()
    server = hostile("bomb", bomb)
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError) as caught:
        data.fetch(dest, mirrors=(server.url,), retries=1, timeout=10.0)
    assert "padded" in str(caught.value) and "\n" not in str(caught.value)
    assert left_behind(dest) == []
