"""The Fashion-MNIST data layer: find the files, read and validate them, split, normalise, batch, augment.

`load_data()` keeps the contract of `keras.datasets.fashion_mnist.load_data()` (uint8 numpy arrays) so code
written for the classic projects ports in one line. Every failure raises a `DatasetError` subclass whose
one-line message names the file, the problem and the fix.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import math
import os
import struct
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fmnist.errors import ChecksumError, DataFormatError, DatasetNotFoundError, DownloadError
from fmnist.files import publish

log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28
# Pixel statistics of the 60,000 training images on a 0..1 scale (measured by `fmnist data info`).
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530

SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# MD5 of the decompressed files: Debian recompressed the .gz files, so only the content is stable.
CONTENT_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
# MD5 of the upstream .gz files, as published in the Fashion-MNIST README.
UPSTREAM_GZ_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
KAGGLE_CSV: dict[str, str] = {"train": "fashion-mnist_train.csv", "test": "fashion-mnist_test.csv"}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# https first (the copy Keras downloads); upstream's S3 website serves plain http only. Every file is checked against
# its published MD5 before it is kept, so the http fallback cannot slip in altered data.
DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
# The real splits hold 60,000 and 10,000 images; a header promising more is refused before anything is inflated,
# so a small gzip file cannot expand into gigabytes (at most 16 + 100,000 x 784 bytes, 78 MB, are ever read).
MAX_IDX_IMAGES = 100_000
# The largest upstream file (train images) is 26 MB gzipped; a mirror sending more is sending something else.
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_FETCH_HINT = "run `fmnist data fetch` (or install Debian's dataset-fashion-mnist)"

Arrays = tuple[np.ndarray, np.ndarray]
ProgressCallback = Callable[[str, int, "int | None"], None]


# ----------------------------------------------------------------------------------------------- locating
@dataclass(frozen=True)
class DataSource:
    """Where the dataset was found: the folder, how it was chosen, and its file format."""

    path: Path
    origin: str  # "argument", "FMNIST_DATA", "cache", "debian" or "download"
    format: str  # "idx" or "csv"


def cache_dir() -> Path:
    """The per-user cache folder, `$XDG_CACHE_HOME/fmnist` or `~/.cache/fmnist`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fmnist"


def _idx_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def detect_format(directory: Path) -> str | None:
    """Return "idx" or "csv" when `directory` holds a complete dataset in that format, else None."""
    if not directory.is_dir():
        return None
    names = [n for pair in SPLIT_FILES.values() for n in pair]
    if all(_idx_file(directory, n) for n in names):
        return "idx"
    if all((directory / f).is_file() for f in KAGGLE_CSV.values()):
        return "csv"
    return None


def locate_data(data_dir: str | os.PathLike | None = None, download: bool = True) -> DataSource:
    """Find the dataset: explicit folder, `$FMNIST_DATA`, user cache, Debian's folder, then a download."""
    for origin, chosen in (("argument", data_dir), ("FMNIST_DATA", os.environ.get("FMNIST_DATA"))):
        if chosen:
            directory = Path(chosen).expanduser()
            fmt = detect_format(directory)
            if fmt is None:
                raise DatasetNotFoundError(
                    f"{directory}: no complete Fashion-MNIST dataset there (4 IDX files such as "
                    f"train-images-idx3-ubyte.gz, or {KAGGLE_CSV['train']} + {KAGGLE_CSV['test']}); "
                    f"fix the path ({origin}) or leave it unset to use the default locations"
                )
            return DataSource(directory, origin, fmt)
    for origin, directory in (("cache", cache_dir()), ("debian", DEBIAN_DIR)):
        fmt = detect_format(directory)
        if fmt is not None:
            return DataSource(directory, origin, fmt)
    if not download:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {cache_dir()} or {DEBIAN_DIR}; {_FETCH_HINT}, or set FMNIST_DATA"
        )
    log.info("Fashion-MNIST not found locally; downloading into %s", cache_dir())
    fetch(cache_dir())
    return DataSource(cache_dir(), "download", "idx")


# ----------------------------------------------------------------------------------------------- reading
def _open_idx(path: Path) -> tuple[BinaryIO, bool]:
    """Open a dataset file for streaming: the open file, and whether it is gzip (told by its magic bytes)."""
    try:
        raw = path.open("rb")
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path}: file not found; {_FETCH_HINT}") from None
    except OSError as error:
        raise DatasetNotFoundError(f"{path}: cannot read ({error.strerror}); check its permissions") from None
    try:
        packed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
    except OSError as error:
        raw.close()
        raise DatasetNotFoundError(f"{path}: cannot read ({error.strerror}); check its permissions") from None
    return raw, packed


def _idx_header(stream: BinaryIO, name: str, magic: int) -> tuple[bytes, int]:
    """Read and check an IDX header: the header bytes and the body size it promises, within the caps."""
    fix = f"the file is not a valid IDX file; replace it ({_FETCH_HINT})"
    head = stream.read(4)
    if not head:
        raise DataFormatError(f"{name}: empty file; {fix}")
    if len(head) < 4:
        raise DataFormatError(f"{name}: {len(head)} bytes is too short for an IDX header; {fix}")
    found = struct.unpack(">I", head)[0]
    if head[:3] != b"\x00\x00\x08" or head[3] not in (1, 3):
        raise DataFormatError(f"{name}: bad magic number 0x{found:08x} (expected 0x00000801 or 0x00000803); {fix}")
    if found != magic:
        raise DataFormatError(f"{name}: magic number 0x{found:08x}, expected 0x{magic:08x}; "
                              "images and labels files may be swapped")
    raw_dims = stream.read(4 * head[3])
    if len(raw_dims) < 4 * head[3]:
        raise DataFormatError(f"{name}: header truncated ({4 + len(raw_dims)} of {4 + 4 * head[3]} bytes); {fix}")
    dims = struct.unpack(f">{head[3]}I", raw_dims)
    if magic == IMAGES_MAGIC and dims[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataFormatError(f"{name}: images are {dims[1]}x{dims[2]}, expected 28x28; "
                              "this is not Fashion-MNIST-shaped data")
    if dims[0] > MAX_IDX_IMAGES:
        what = "images" if magic == IMAGES_MAGIC else "labels"
        raise DataFormatError(f"{name}: header promises {dims[0]:,} {what}, more than the {MAX_IDX_IMAGES:,} a "
                              f"Fashion-MNIST file holds; the file is damaged or not Fashion-MNIST: replace it "
                              f"({_FETCH_HINT})")
    return head + raw_dims, math.prod(dims)


def _read_body(stream: BinaryIO, content: memoryview) -> int:
    """Fill `content` from `stream`; the number of bytes read (fewer at the end of the data). In 1 MiB steps: a
    gzip reader asked for everything at once builds a second copy of it first."""
    filled = 0
    while filled < len(content):
        count = stream.readinto(content[filled:filled + (1 << 20)])
        if not count:
            break
        filled += count
    return filled


def read_idx_bytes(path: Path, magic: int) -> bytearray:
    """An IDX file's bytes (plain or gzipped), read only as far as its checked header promises.

    Why: `gzip.decompress` of the whole file let a 2 MB gzip bomb inflate to gigabytes; here the header is read
    and bounded first, exactly the promised body is read, and one byte more (trailing data) is an error.
    """
    raw, packed = _open_idx(path)
    try:
        with raw, (gzip.GzipFile(fileobj=raw, mode="rb") if packed else contextlib.nullcontext(raw)) as stream:
            header, size = _idx_header(stream, str(path), magic)
            content = bytearray(len(header) + size)
            content[:len(header)] = header
            got = _read_body(stream, memoryview(content)[len(header):])
            trailing = stream.read(1)
    except (OSError, EOFError, zlib.error) as error:
        if not packed:
            raise DatasetNotFoundError(f"{path}: cannot read ({error}); check the file") from None
        raise DataFormatError(f"{path}: corrupt gzip data ({error}); delete it and {_FETCH_HINT}") from None
    if got < size or trailing:
        problem = f"ends after {got} of" if got < size else "has data after"
        raise DataFormatError(f"{path}: {problem} the {size} bytes of data its header promises; the file is "
                              f"{'truncated' if got < size else 'padded'}; replace it ({_FETCH_HINT})")
    return content  # no copy: callers hash or parse it


def _magic_for(name: str) -> int:
    """The IDX magic a dataset file name implies (images or labels)."""
    return IMAGES_MAGIC if "-images-" in name else LABELS_MAGIC


def parse_idx(data: bytes, name: str = "<bytes>", magic: int | None = None) -> np.ndarray:
    """Decode IDX bytes (unsigned-byte type) into a uint8 array, validating header and length."""
    fix = f"the file is not a valid IDX file; replace it ({_FETCH_HINT})"
    if len(data) == 0:
        raise DataFormatError(f"{name}: empty file; {fix}")
    if len(data) < 4:
        raise DataFormatError(f"{name}: {len(data)} bytes is too short for an IDX header; {fix}")
    found_magic = struct.unpack(">I", data[:4])[0]
    if data[:3] != b"\x00\x00\x08" or data[3] not in (1, 3):
        raise DataFormatError(f"{name}: bad magic number 0x{found_magic:08x} "
                              f"(expected 0x00000801 or 0x00000803); {fix}")
    if magic is not None and found_magic != magic:
        raise DataFormatError(f"{name}: magic number 0x{found_magic:08x}, expected 0x{magic:08x}; "
                              "images and labels files may be swapped")
    ndim = data[3]
    header_length = 4 + 4 * ndim
    if len(data) < header_length:
        raise DataFormatError(f"{name}: header truncated ({len(data)} of {header_length} bytes); {fix}")
    dims = struct.unpack(f">{ndim}I", data[4:header_length])
    expected = header_length + math.prod(dims)  # Python ints: a huge header cannot wrap
    if len(data) != expected:
        raise DataFormatError(f"{name}: {len(data)} bytes but its header {dims} needs {expected}; "
                              f"the file is truncated or padded; {fix}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_length).reshape(dims).copy()


def _verify(path: Path, content: bytes, name: str) -> None:
    expected = CONTENT_MD5.get(name)
    if expected is None:
        return
    found = hashlib.md5(content).hexdigest()
    if found != expected:
        raise ChecksumError(f"{path}: MD5 {found} differs from the published {expected}; the file is corrupt or "
                            f"not Fashion-MNIST: delete it and {_FETCH_HINT}, or pass --no-verify for custom data")


def read_idx_pair(images_path: Path, labels_path: Path, verify: bool = True) -> Arrays:
    """Read and cross-check one split's images and labels files."""
    arrays = []
    for path, magic in ((images_path, IMAGES_MAGIC), (labels_path, LABELS_MAGIC)):
        content = read_idx_bytes(path, magic)
        name = path.name.removesuffix(".gz")
        if verify:
            _verify(path, content, name)
        arrays.append(parse_idx(content, str(path), magic))
    images, labels = arrays
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataFormatError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28; "
                              "this is not Fashion-MNIST-shaped data")
    _check_labels(images, labels, f"{images_path} / {labels_path}")
    return images, labels


def _check_labels(images: np.ndarray, labels: np.ndarray, name: str) -> None:
    if len(images) != len(labels):
        raise DataFormatError(f"{name}: {len(images)} images but {len(labels)} labels; "
                              "the two files belong to different splits or one is damaged")
    if labels.size and labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DataFormatError(f"{name}: label {int(labels[bad])} at index {bad} is outside 0..9; "
                              "the labels file is damaged or not Fashion-MNIST")


def read_csv(path: Path) -> Arrays:
    """Read a Kaggle-style CSV (`label,pixel1..pixel784` with a header row) into uint8 arrays."""
    path = Path(path)
    try:
        with path.open("r", encoding="ascii") as handle:
            header = handle.readline().strip().split(",")
            if not header or header[0] != "label" or len(header) != 1 + IMAGE_SIZE * IMAGE_SIZE:
                raise DataFormatError(f"{path}: header must be `label,pixel1,...,pixel784` "
                                      f"(found {len(header)} columns starting {header[0]!r}); not a Kaggle CSV")
            with warnings.catch_warnings():  # an empty body is reported below, not as a warning
                warnings.simplefilter("ignore", UserWarning)
                table = np.loadtxt(handle, delimiter=",", dtype=np.int64, ndmin=2)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path}: file not found; check the path") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise DataFormatError(f"{path}: unreadable CSV row ({str(error).splitlines()[0]}); "
                              "every row needs 785 integers") from None
    if table.size == 0:
        raise DataFormatError(f"{path}: no data rows after the header; the file is empty or cut short")
    if table.shape[1] != 1 + IMAGE_SIZE * IMAGE_SIZE:
        raise DataFormatError(f"{path}: rows have {table.shape[1]} values, expected 785")
    if table.size and (table[:, 1:].min() < 0 or table[:, 1:].max() > 255):
        raise DataFormatError(f"{path}: pixel values outside 0..255; the file is damaged")
    labels = table[:, 0]
    images = table[:, 1:].astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    if labels.size and labels.min() < 0:
        raise DataFormatError(f"{path}: negative label; labels must be 0..9")
    _check_labels(images, labels, str(path))
    return images, labels.astype(np.uint8)


def load_split(source: DataSource, split: str, verify: bool = True) -> Arrays:
    """Load one split ("train" or "test") from a located source."""
    if source.format == "csv":
        return read_csv(source.path / KAGGLE_CSV[split])
    images_name, labels_name = SPLIT_FILES[split]
    return read_idx_pair(_idx_file(source.path, images_name) or source.path / images_name,
                         _idx_file(source.path, labels_name) or source.path / labels_name, verify)


def load_data(data_dir: str | os.PathLike | None = None, verify: bool = True) -> tuple[Arrays, Arrays]:
    """Return `((x_train, y_train), (x_test, y_test))` as uint8 arrays, like Keras' `load_data()`.

    `verify` checks the known MD5 of each file's content; turn it off for a custom dataset in IDX form.
    """
    source = locate_data(data_dir)
    return load_split(source, "train", verify), load_split(source, "test", verify)


# ----------------------------------------------------------------------------------------------- download
def _md5_of_content(path: Path) -> str:
    """MD5 of the decompressed content, read through the bounded IDX reader (a downloaded bomb is refused)."""
    return hashlib.md5(read_idx_bytes(path, _magic_for(path.name))).hexdigest()


def _too_large(url: str, size: str, max_bytes: int) -> DownloadError:
    return DownloadError(f"{url}: {size} is more than the {max_bytes / 2**20:g} MiB a dataset file can be; "
                         "the mirror serves something else: use another mirror")


def _download_once(url: str, target: Path, name: str, timeout: float, progress: ProgressCallback | None,
                   max_bytes: int = MAX_DOWNLOAD_BYTES) -> None:
    """Stream `url` to a temporary file beside `target`, stopping past `max_bytes`; verify; rename into place, or
    leave nothing."""
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False)
    part = Path(handle.name)
    try:
        with handle, urllib.request.urlopen(url, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            if total is not None and total > max_bytes:
                raise _too_large(url, f"its announced size of {total:,} bytes", max_bytes)
            received = 0
            while chunk := response.read(min(1 << 20, max_bytes + 1 - received)):
                received += len(chunk)
                if received > max_bytes:
                    raise _too_large(url, f"the download (stopped at {received:,} bytes)", max_bytes)
                handle.write(chunk)
                if progress:
                    progress(name, received, total)
        if total is not None and received != total:
            raise DownloadError(f"{url}: connection closed after {received} of {total} bytes")
        found = _md5_of_content(part)
        if found != CONTENT_MD5[name]:
            raise ChecksumError(f"{url}: downloaded content has MD5 {found}, expected {CONTENT_MD5[name]}")
        publish(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def fetch(
    dest: str | os.PathLike | None = None,
    mirrors: tuple[str, ...] | None = None,
    retries: int = 3,
    timeout: float = 30.0,
    progress: ProgressCallback | None = None,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> Path:
    """Download the four upstream files into `dest` (default: the cache), verified; skip ones already good.

    Mirrors come from the argument, else `$FMNIST_MIRROR` (comma-separated base URLs), else upstream.
    An interrupted, oversized (over `max_bytes`) or corrupt download leaves either the verified file or nothing.
    """
    directory = Path(dest) if dest else cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if mirrors is None:
        env = os.environ.get("FMNIST_MIRROR")
        mirrors = tuple(m.strip() for m in env.split(",") if m.strip()) if env else DEFAULT_MIRRORS
    for mirror in mirrors:
        if not mirror.startswith(("http://", "https://")):
            raise DownloadError(f"mirror {mirror!r} is not an http(s) URL; give a base URL like https://host/path/")
    for name in CONTENT_MD5:
        target = directory / f"{name}.gz"
        if target.exists():
            try:
                if _md5_of_content(target) == CONTENT_MD5[name]:
                    continue
            except (DataFormatError, DatasetNotFoundError):
                pass
            log.warning("%s is corrupt; downloading it again", target)
        errors = []
        for attempt in range(retries):
            for mirror in mirrors:
                url = mirror.rstrip("/") + f"/{name}.gz"
                try:
                    log.info("downloading %s", url)
                    _download_once(url, target, name, timeout, progress, max_bytes)
                    break
                except (OSError, http.client.HTTPException, DownloadError, ChecksumError, DataFormatError) as error:
                    errors.append(f"{url}: {error}")
                    log.warning("download failed (%s)", error)
            else:
                if attempt < retries - 1:
                    time.sleep(min(0.5 * 2**attempt, 4.0))
                continue
            break
        else:
            raise DownloadError(f"{name}.gz: download failed after {retries} tries from {len(mirrors)} mirror(s) "
                                f"(last: {errors[-1] if errors else 'no mirror'}); check the network or set "
                                "FMNIST_MIRROR, or install Debian's dataset-fashion-mnist")
    return directory


# ----------------------------------------------------------------------------------------------- splits
def validation_split(x: np.ndarray, y: np.ndarray, size: int | float = 5000, seed: int = 0) -> tuple[Arrays, Arrays]:
    """Split off a class-stratified, seeded validation set: returns `((x_train, y_train), (x_val, y_val))`."""
    from sklearn.model_selection import train_test_split

    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=size, stratify=y, random_state=seed)
    return (x_train, y_train), (x_val, y_val)


def pooled_split(train: Arrays, test: Arrays, test_fraction: float = 0.2, seed: int = 0) -> tuple[Arrays, Arrays]:
    """Pool all 70,000 images and re-split them at random, as `fetch_openml` + `train_test_split` projects do."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    x = np.concatenate([train[0], test[0]])
    y = np.concatenate([train[1], test[1]])
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed)
    return (x_train, y_train), (x_test, y_test)


# ----------------------------------------------------------------------------------------------- tensors
def normalization(standardize: bool) -> tuple[float, float]:
    """(mean, std) of the pixel scaling: the training set's statistics, or (0, 1) for plain x / 255."""
    return (PIXEL_MEAN, PIXEL_STD) if standardize else (0.0, 1.0)


def preprocess(images, mean: float = 0.0, std: float = 1.0, channels_last: bool = False):
    """The one path from pixels to a model input: uint8 (0..255) or float (0..1) images, shape (n, 28, 28) or
    (28, 28), as NumPy or torch -> float32 tensor (n, 1, 28, 28) holding (x / 255 - mean) / std.

    Training, `Classifier`, evaluation and the exported ONNX graph all call this, so they scale alike to the bit.
    Out-of-place operations: the caller's array is never changed, and torch.export can trace it.
    """
    import torch

    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images if images.flags.writeable else images.copy())
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if mean != 0.0 or std != 1.0:
        x = (x - mean) / std
    x = x.unsqueeze(0) if x.dim() == 2 else x
    x = x.unsqueeze(1) if x.dim() == 3 else x
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


# Test-time views: the image and its mirror image weigh a quarter each; the 1-pixel shifts up, down, left and right
# of both share the other half. On the validation split the shifts added 0.12 points (fast) and 0.14 (default) to
# flips alone, while the two diagonal shifts lost 0.1 (docs/recipe-study.md).
TTA_SHIFTS = ((-1, 0), (1, 0), (0, -1), (0, 1))
TTA_WEIGHTS = (0.25, 0.25) + (0.5 / (2 * len(TTA_SHIFTS)),) * (2 * len(TTA_SHIFTS))


def shift(images, dy: int, dx: int):
    """Images moved by (dy, dx) pixels, the edge repeated into the gap (black for dataset images, whatever the
    normalisation): on the last two axes of a NumPy array or a torch tensor."""
    pad = max(abs(dy), abs(dx))
    if isinstance(images, np.ndarray):
        padded = np.pad(images, [(0, 0)] * (images.ndim - 2) + [(pad, pad), (pad, pad)], mode="edge")
    else:
        import torch.nn.functional as F

        shape = images.shape
        padded = F.pad(images.reshape(-1, 1, *shape[-2:]), (pad,) * 4, mode="replicate").reshape(
            *shape[:-2], shape[-2] + 2 * pad, shape[-1] + 2 * pad)
    height, width = images.shape[-2:]
    view = padded[..., pad - dy:pad - dy + height, pad - dx:pad - dx + width]
    return np.ascontiguousarray(view) if isinstance(images, np.ndarray) else view.contiguous()


def tta_views(images):
    """Test-time augmentation views, weighted by `TTA_WEIGHTS`: the image, its mirror image (clothing is left-right
    symmetric here), and both moved by one pixel along each axis.

    Works on model inputs (torch) and on pixel arrays (NumPy), so every engine averages the same views.
    """
    mirror = np.ascontiguousarray(images[..., ::-1]) if isinstance(images, np.ndarray) else images.flip(-1)
    return [images, mirror, *(shift(view, dy, dx) for dy, dx in TTA_SHIFTS for view in (images, mirror))]


def augment_batch(x, generator, flip: bool = True, translate: int = 0, erase: float = 0.0, fill: float = 0.0):
    """Random horizontal flips, translations by up to `translate` pixels (zero fill) and random erasing.

    `fill` is the value of a black pixel after normalisation. Works on a whole (n, 1, 28, 28) batch at once
    with gathers, so augmentation costs no Python loop per image. The random numbers come from `generator` (a CPU
    generator) and then move to the batch's device, so a seed gives the same augmentation on a CPU and a GPU.
    """
    import torch

    n, _, height, width = x.shape
    device = x.device

    def draw(tensor):
        return tensor.to(device)

    if flip:
        mirror = draw(torch.rand(n, generator=generator)) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    if translate:
        padded = torch.nn.functional.pad(x, (translate,) * 4, value=fill)
        dy = draw(torch.randint(0, 2 * translate + 1, (n,), generator=generator))
        dx = draw(torch.randint(0, 2 * translate + 1, (n,), generator=generator))
        rows = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None]
        rows = rows.expand(n, 1, height, width + 2 * translate)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :].expand(n, 1, height, width)
        x = x.gather(3, cols)
    if erase:
        size = max(1, int(round(height * erase)))
        top = draw(torch.randint(0, height - size + 1, (n,), generator=generator))
        left = draw(torch.randint(0, width - size + 1, (n,), generator=generator))
        apply = draw(torch.rand(n, generator=generator)) < 0.5
        r = torch.arange(height, device=device)
        c = torch.arange(width, device=device)
        inside = ((r[None, :, None] >= top[:, None, None]) & (r[None, :, None] < (top + size)[:, None, None])
                  & (c[None, None, :] >= left[:, None, None]) & (c[None, None, :] < (left + size)[:, None, None]))
        x = x.masked_fill((inside & apply[:, None, None])[:, None], fill)
    return x


def iterate_batches(n: int, batch_size: int, generator=None, shuffle: bool = True) -> Iterator:
    """Yield index tensors for one epoch: slices of one seeded permutation (no DataLoader overhead)."""
    import torch

    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def __getattr__(name: str):
    """`fmnist.data.FashionMNIST`, the torch `Dataset`, imported on first use: it subclasses a torch class, so it
    lives in `fmnist.dataset`, and importing this module stays free of torch."""
    if name == "FashionMNIST":
        from fmnist.dataset import FashionMNIST

        return FashionMNIST
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
