"""Shared fixtures for the whole test suite: IDX/CSV writers, tiny datasets, the real dataset, an isolated env.

The only autouse fixture isolates the environment (user cache, FMNIST_DATA, FMNIST_MIRROR); everything else is
requested explicitly, so training and model tests can reuse these fixtures without data-specific side effects.
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from fmnist import data
from fmnist.errors import DatasetNotFoundError

TINY_TRAIN = 50
TINY_TEST = 20


# ----------------------------------------------------------------------------------------------- helpers
def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Encode a uint8 array as IDX bytes; `magic` defaults to 0x00000800 | ndim (0x801 labels, 0x803 images)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x00000800 | array.ndim
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: str | Path, array: np.ndarray, magic: int | None = None) -> Path:
    """Write `array` as an IDX file at `path`, gzipped when the name ends in `.gz`."""
    path = Path(path)
    payload = idx_bytes(array, magic)
    if path.suffix == ".gz":
        payload = gzip.compress(payload, compresslevel=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def make_tiny_arrays(n_train: int = TINY_TRAIN, n_test: int = TINY_TEST, seed: int = 0):
    """Deterministic `((x_train, y_train), (x_test, y_test))`: random 28x28 uint8 images, labels cycling 0..9."""
    rng = np.random.default_rng(seed)
    splits = []
    for n in (n_train, n_test):
        images = rng.integers(0, 256, size=(n, data.IMAGE_SIZE, data.IMAGE_SIZE), dtype=np.uint8)
        labels = (np.arange(n) % data.NUM_CLASSES).astype(np.uint8)
        splits.append((images, labels))
    return tuple(splits)


def write_idx_dataset(directory: str | Path, arrays, gz: bool = True) -> Path:
    """Write a complete 4-file IDX dataset with the standard file names (their MD5s will not match)."""
    directory = Path(directory)
    suffix = ".gz" if gz else ""
    for split, (images, labels) in zip(("train", "test"), arrays, strict=True):
        images_name, labels_name = data.SPLIT_FILES[split]
        write_idx(directory / f"{images_name}{suffix}", images, data.IMAGES_MAGIC)
        write_idx(directory / f"{labels_name}{suffix}", labels, data.LABELS_MAGIC)
    return directory


def csv_text(images: np.ndarray, labels: np.ndarray) -> str:
    """Kaggle-style CSV text: a `label,pixel1,...,pixel784` header, then one row per image."""
    pixels = data.IMAGE_SIZE * data.IMAGE_SIZE
    lines = ["label," + ",".join(f"pixel{i}" for i in range(1, pixels + 1))]
    flat = images.reshape(len(images), -1)
    lines += [f"{int(label)}," + ",".join(map(str, row.tolist())) for label, row in zip(labels, flat, strict=True)]
    return "\n".join(lines) + "\n"


def write_csv_dataset(directory: str | Path, arrays) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in zip(("train", "test"), arrays, strict=True):
        (directory / data.KAGGLE_CSV[split]).write_text(csv_text(images, labels), encoding="ascii")
    return directory


# ----------------------------------------------------------------------------------------------- shared helpers
def assert_error(response, status: int, pattern: str) -> None:
    """An HTTP answer is the one-line JSON error the service promises: `{"error": "..."}` with this status."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"], body
    assert re.search(pattern, body["error"]), body["error"]


def left_behind(dest: Path) -> list[str]:
    """What a failed download or write left in `dest` (it must leave nothing)."""
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path_factory):
    """Never touch the user's cache or follow their FMNIST_* settings: a fresh XDG cache per test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    monkeypatch.delenv("FMNIST_MIRROR", raising=False)


@pytest.fixture
def no_proxy(monkeypatch):
    """urllib honours *_proxy variables; the local mirrors of the download tests must be reached directly."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def tiny_arrays():
    """The arrays that `tiny_idx_dir` and `tiny_csv_dir` hold: 50 train and 20 test images."""
    return make_tiny_arrays()


@pytest.fixture
def tiny_idx_dir(tmp_path, tiny_arrays) -> Path:
    """A complete gzipped IDX dataset (standard names, wrong checksums: load it with verify=False)."""
    return write_idx_dataset(tmp_path / "tiny-idx", tiny_arrays)


@pytest.fixture
def tiny_csv_dir(tmp_path, tiny_arrays) -> Path:
    """A complete Kaggle-style CSV dataset (fashion-mnist_train.csv / fashion-mnist_test.csv)."""
    return write_csv_dataset(tmp_path / "tiny-csv", tiny_arrays)


@pytest.fixture(scope="session")
def real_data_source() -> data.DataSource:
    """Where the real dataset lives on this machine, found with the user's real environment (never downloads).

    Session-scoped fixtures are set up outside the per-test isolation, so this sees $FMNIST_DATA, the user's
    cache and Debian's folder. Tests that need the real data skip when it is not installed (`make dataset`).
    """
    try:
        return data.locate_data(download=False)
    except DatasetNotFoundError as error:
        pytest.fail(f"real Fashion-MNIST not installed ({error}); run `make dataset`")


@pytest.fixture
def use_real_data(monkeypatch, real_data_source) -> data.DataSource:
    """Make the default lookup (no data_dir) find the real dataset inside the isolated environment."""
    if real_data_source.origin != "debian":
        monkeypatch.setenv("FMNIST_DATA", str(real_data_source.path))
    return real_data_source


@pytest.fixture(scope="session")
def real_mlp_run(tmp_path_factory, real_data_source) -> Path:
    """A small calibrated MLP trained for seconds on real images (~84% test accuracy), shared by the service tests.

    Tests only read it; a test that changes a run trains its own.
    """
    from fmnist import training

    folder = tmp_path_factory.mktemp("real-mlp") / "run"
    config = training.resolve_config("classic-adam", {"epochs": 2, "train_subset": 5000, "test_subset": 1000,
                                                      "validation": 500})
    training.train(config, out_dir=folder, data_dir=real_data_source.path)
    return folder
