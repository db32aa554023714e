"""The data layer: the real dataset, where it is found, the IDX/CSV readers and their errors, the splits."""

from __future__ import annotations

import gzip
import hashlib
import math
import struct

import numpy as np
import pytest
from conftest import csv_text, idx_bytes, make_tiny_arrays, write_idx, write_idx_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fmnist
from fmnist import data
from fmnist.errors import ChecksumError, DataFormatError, DatasetError, DatasetNotFoundError


def _assert_same(actual, expected) -> None:
    for (x, y), (ex, ey) in zip(actual, expected, strict=True):
        assert x.dtype == np.uint8 and y.dtype == np.uint8
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)


# ----------------------------------------------------------------------------------------------- real dataset
@pytest.fixture(scope="module")
def real(real_data_source, tmp_path_factory):
    """`fmnist.load_data()` on the real dataset, once per module, through the default lookup (verify=True)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("real-xdg")))
        mp.delenv("FMNIST_MIRROR", raising=False)
        if real_data_source.origin == "debian":
            mp.delenv("FMNIST_DATA", raising=False)
        else:
            mp.setenv("FMNIST_DATA", str(real_data_source.path))
        return fmnist.load_data()


def test_real_shapes_and_dtypes(real):
    (x_train, y_train), (x_test, y_test) = real
    assert x_train.shape == (60000, 28, 28) and x_train.dtype == np.uint8
    assert y_train.shape == (60000,) and y_train.dtype == np.uint8
    assert x_test.shape == (10000, 28, 28) and x_test.dtype == np.uint8
    assert y_test.shape == (10000,) and y_test.dtype == np.uint8


def test_real_classes_are_balanced(real):
    (_, y_train), (_, y_test) = real
    assert np.bincount(y_train, minlength=11).tolist() == [6000] * 10 + [0]
    assert np.bincount(y_test, minlength=11).tolist() == [1000] * 10 + [0]


def test_real_content_md5_matches(real_data_source):
    if real_data_source.format != "idx":
        pytest.skip("the real dataset here is in CSV form")
    assert set(data.CONTENT_MD5) == {name for pair in data.SPLIT_FILES.values() for name in pair}
    for name, expected in data.CONTENT_MD5.items():
        path = data._idx_file(real_data_source.path, name)
        assert path is not None, name
        raw = path.read_bytes()
        content = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        assert hashlib.md5(content).hexdigest() == expected, path
        # the verifying reader agrees
        data._verify(path, content, name)


def test_real_pixel_statistics(real):
    (x_train, _), _ = real
    flat = x_train.reshape(-1)
    chunk = 1 << 22  # bincount works on intp: count in chunks instead of one 376 MB temporary
    histogram = sum(np.bincount(flat[i:i + chunk], minlength=256) for i in range(0, flat.size, chunk))
    histogram = histogram.astype(np.float64)
    values = np.arange(256) / 255.0
    mean = (histogram * values).sum() / histogram.sum()
    std = math.sqrt((histogram * (values - mean) ** 2).sum() / histogram.sum())
    assert mean == pytest.approx(data.PIXEL_MEAN, abs=1e-3)
    assert std == pytest.approx(data.PIXEL_STD, abs=1e-3)


def test_real_load_is_independent_copy(real):
    (x_train, _), _ = real
    assert x_train.flags.writeable and x_train.flags.c_contiguous


# ----------------------------------------------------------------------------------------------- locating
@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Point the Debian folder at an empty place."""
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / "fmnist"


def test_explicit_dir_beats_env_cache_and_debian(monkeypatch, tmp_path, tiny_arrays):
    explicit = write_idx_dataset(tmp_path / "explicit", tiny_arrays)
    env = write_idx_dataset(tmp_path / "env", tiny_arrays)
    write_idx_dataset(data.cache_dir(), tiny_arrays)
    monkeypatch.setattr(data, "DEBIAN_DIR", write_idx_dataset(tmp_path / "debian", tiny_arrays))
    monkeypatch.setenv("FMNIST_DATA", str(env))
    assert data.locate_data(explicit, download=False) == data.DataSource(explicit, "argument", "idx")
    assert data.locate_data(str(explicit), download=False).path == explicit


def test_env_beats_cache_and_debian(monkeypatch, tmp_path, tiny_arrays):
    env = write_idx_dataset(tmp_path / "env", tiny_arrays)
    write_idx_dataset(data.cache_dir(), tiny_arrays)
    monkeypatch.setattr(data, "DEBIAN_DIR", write_idx_dataset(tmp_path / "debian", tiny_arrays))
    monkeypatch.setenv("FMNIST_DATA", str(env))
    assert data.locate_data(download=False) == data.DataSource(env, "FMNIST_DATA", "idx")


def test_cache_beats_debian(monkeypatch, tmp_path, tiny_arrays):
    cache = write_idx_dataset(data.cache_dir(), tiny_arrays)
    monkeypatch.setattr(data, "DEBIAN_DIR", write_idx_dataset(tmp_path / "debian", tiny_arrays))
    assert data.locate_data(download=False) == data.DataSource(cache, "cache", "idx")


def test_debian_is_the_last_local_place(monkeypatch, tmp_path, tiny_arrays):
    debian = write_idx_dataset(tmp_path / "debian", tiny_arrays)
    monkeypatch.setattr(data, "DEBIAN_DIR", debian)
    assert data.locate_data(download=False) == data.DataSource(debian, "debian", "idx")


def test_incomplete_cache_is_skipped(monkeypatch, tmp_path, tiny_arrays):
    cache = write_idx_dataset(data.cache_dir(), tiny_arrays)
    (cache / "t10k-labels-idx1-ubyte.gz").unlink()
    debian = write_idx_dataset(tmp_path / "debian", tiny_arrays)
    monkeypatch.setattr(data, "DEBIAN_DIR", debian)
    assert data.locate_data(download=False).origin == "debian"


def test_explicit_dir_without_data_does_not_fall_through(monkeypatch, tmp_path, tiny_arrays):
    env = write_idx_dataset(tmp_path / "env", tiny_arrays)
    write_idx_dataset(data.cache_dir(), tiny_arrays)
    monkeypatch.setenv("FMNIST_DATA", str(env))
    empty = tmp_path / "empty"
    empty.mkdir()
    for missing in (empty, tmp_path / "does-not-exist"):
        with pytest.raises(DatasetNotFoundError, match="no complete Fashion-MNIST dataset") as excinfo:
            data.locate_data(missing, download=False)
        assert str(missing) in str(excinfo.value)
        with pytest.raises(DatasetNotFoundError):
            data.load_data(missing)


def test_bad_env_dir_does_not_fall_through(monkeypatch, tmp_path, tiny_arrays):
    write_idx_dataset(data.cache_dir(), tiny_arrays)
    monkeypatch.setenv("FMNIST_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match="FMNIST_DATA"):
        data.locate_data(download=False)


@pytest.mark.usefixtures("no_debian")
def test_nothing_anywhere_without_download_raises():
    with pytest.raises(DatasetNotFoundError) as excinfo:
        data.locate_data(download=False)
    message = str(excinfo.value)
    assert str(data.cache_dir()) in message and "fmnist data fetch" in message and "\n" not in message


def test_detect_format(tmp_path, tiny_idx_dir, tiny_csv_dir):
    assert data.detect_format(tiny_idx_dir) == "idx"
    assert data.detect_format(tiny_csv_dir) == "csv"
    assert data.detect_format(tmp_path / "missing") is None
    (tiny_csv_dir / data.KAGGLE_CSV["test"]).unlink()
    assert data.detect_format(tiny_csv_dir) is None


# ----------------------------------------------------------------------------------------------- readers
def test_tiny_idx_gz_round_trip(tiny_idx_dir, tiny_arrays):
    _assert_same(data.load_data(tiny_idx_dir, verify=False), tiny_arrays)
    assert data.locate_data(tiny_idx_dir).format == "idx"


def test_tiny_idx_uncompressed_round_trip(tmp_path, tiny_arrays):
    directory = write_idx_dataset(tmp_path / "raw", tiny_arrays, gz=False)
    assert not list(directory.glob("*.gz"))
    _assert_same(data.load_data(directory, verify=False), tiny_arrays)


def test_gzip_is_detected_by_content_not_name(tmp_path, tiny_arrays):
    directory = write_idx_dataset(tmp_path / "raw", tiny_arrays, gz=False)
    # a gzipped file without the .gz suffix, and a plain file with it
    images = directory / "train-images-idx3-ubyte"
    images.write_bytes(gzip.compress(images.read_bytes()))
    labels = directory / "t10k-labels-idx1-ubyte"
    labels.rename(directory / "t10k-labels-idx1-ubyte.gz")
    _assert_same(data.load_data(directory, verify=False), tiny_arrays)


def test_tiny_csv_round_trip(tiny_csv_dir, tiny_arrays):
    assert data.locate_data(tiny_csv_dir).format == "csv"
    _assert_same(data.load_data(tiny_csv_dir), tiny_arrays)


def test_tiny_checksum_mismatch_is_checksum_error(tiny_idx_dir):
    """Files with the standard names but other content fail verification, naming the file."""
    with pytest.raises(ChecksumError) as excinfo:
        data.load_data(tiny_idx_dir, verify=True)
    message = str(excinfo.value)
    assert "train-images-idx3-ubyte.gz" in message and "MD5" in message and "\n" not in message


def _labels(n=50):
    return (np.arange(n) % 10).astype(np.uint8)


def _images(n=50, h=28, w=28):
    return np.random.default_rng(1).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def _gz(payload: bytes) -> bytes:
    return gzip.compress(payload, compresslevel=1)


IMAGES = "train-images-idx3-ubyte.gz"
LABELS = "train-labels-idx1-ubyte.gz"

# (case id, file to replace, its new bytes (or None to delete it), expected error, message fragment)
BAD_IDX_CASES = [
    ("truncated", IMAGES, lambda: _gz(idx_bytes(_images())[:-100]), DataFormatError, "truncated"),
    ("padded", LABELS, lambda: _gz(idx_bytes(_labels()) + b"\0"), DataFormatError, "padded"),
    ("header-truncated", IMAGES, lambda: _gz(idx_bytes(_images())[:10]), DataFormatError, "header truncated"),
    ("too-short", LABELS, lambda: _gz(b"\0\0"), DataFormatError, "too short"),
    ("wrong-magic", IMAGES, lambda: _gz(idx_bytes(_images(), magic=0x00000903)), DataFormatError, "bad magic"),
    ("wrong-type-byte", LABELS, lambda: _gz(idx_bytes(_labels(), magic=0x00000D01)), DataFormatError, "bad magic"),
    ("labels-as-images", IMAGES, lambda: _gz(idx_bytes(_labels())), DataFormatError, "swapped"),
    ("images-as-labels", LABELS, lambda: _gz(idx_bytes(_images())), DataFormatError, "swapped"),
    ("count-mismatch", LABELS, lambda: _gz(idx_bytes(_labels(49))), DataFormatError, "50 images but 49 labels"),
    ("label-10", LABELS, lambda: _gz(idx_bytes(np.where(np.arange(50) == 7, 10, _labels()))), DataFormatError,
     "label 10 at index 7"),
    ("label-255", LABELS, lambda: _gz(idx_bytes(np.full(50, 255))), DataFormatError, "label 255"),
    ("corrupt-gzip", IMAGES, lambda: b"\x1f\x8b" + b"this is not deflate data" * 10, DataFormatError,
     "corrupt gzip"),
    ("truncated-gzip", IMAGES, lambda: _gz(idx_bytes(_images()))[:500], DataFormatError, "corrupt gzip"),
    ("empty-file", IMAGES, lambda: b"", DataFormatError, "empty file"),
    ("empty-gzip", LABELS, lambda: _gz(b""), DataFormatError, "empty file"),
    ("not-28x28", IMAGES, lambda: _gz(idx_bytes(_images(h=27))), DataFormatError, "27x28, expected 28x28"),
    ("32x32", IMAGES, lambda: _gz(idx_bytes(_images(h=32, w=32))), DataFormatError, "expected 28x28"),
]


@pytest.mark.parametrize(("filename", "make", "error", "fragment"), [case[1:] for case in BAD_IDX_CASES],
                         ids=[case[0] for case in BAD_IDX_CASES])
def test_bad_idx_file_gives_specific_error(tiny_idx_dir, filename, make, error, fragment):
    path = tiny_idx_dir / filename
    path.write_bytes(make())
    with pytest.raises(error) as excinfo:
        data.load_data(tiny_idx_dir, verify=False)
    assert type(excinfo.value) is error
    message = str(excinfo.value)
    assert fragment in message
    assert filename in message, message
    assert "\n" not in message


def test_missing_file_is_not_found(tiny_idx_dir):
    images = tiny_idx_dir / IMAGES
    labels = tiny_idx_dir / LABELS
    images.unlink()
    with pytest.raises(DatasetNotFoundError, match=r"train-images-idx3-ubyte\.gz: file not found"):
        data.read_idx_pair(images, labels, verify=False)
    # through the directory lookup it is an incomplete dataset, named by its folder
    with pytest.raises(DatasetNotFoundError, match=str(tiny_idx_dir)):
        data.load_data(tiny_idx_dir, verify=False)


def test_unreadable_path_is_dataset_error(tiny_idx_dir):
    """A directory where a file should be is reported, not a bare OSError."""
    (tiny_idx_dir / IMAGES).unlink()
    (tiny_idx_dir / IMAGES).mkdir()
    with pytest.raises(DatasetError, match=IMAGES):
        data.read_idx_pair(tiny_idx_dir / IMAGES, tiny_idx_dir / LABELS, verify=False)


def test_verify_passes_unknown_names(tmp_path):
    """Custom files with other names have no published MD5: verify=True reads them."""
    images = write_idx(tmp_path / "my-images.gz", _images(10), data.IMAGES_MAGIC)
    labels = write_idx(tmp_path / "my-labels", _labels(10), data.LABELS_MAGIC)
    x, y = data.read_idx_pair(images, labels, verify=True)
    assert x.shape == (10, 28, 28) and y.tolist() == _labels(10).tolist()


# ------------------------------------------------------------------------------------------------- CSV
CSV_HEADER = "label," + ",".join(f"pixel{i}" for i in range(1, 785))


def _row(label=3, pixel=0, columns=784) -> str:
    return ",".join([str(label)] + [str(pixel)] * columns)


BAD_CSV_CASES = [
    ("empty", "", "header must be"),
    ("no-header", _row() + "\n" + _row() + "\n", "header must be"),
    ("bad-header-name", CSV_HEADER.replace("label", "class", 1) + "\n" + _row() + "\n", "header must be"),
    ("short-header", "label,pixel1,pixel2\n" + _row() + "\n", "found 3 columns"),
    ("short-rows", CSV_HEADER + "\n" + _row(columns=783) + "\n" + _row(columns=783) + "\n", "expected 785"),
    ("ragged-rows", CSV_HEADER + "\n" + _row() + "\n" + _row(columns=700) + "\n", "785 integers"),
    ("long-rows", CSV_HEADER + "\n" + _row(columns=785) + "\n", "expected 785"),
    ("pixel-300", CSV_HEADER + "\n" + _row() + "\n" + _row(pixel=300) + "\n", "pixel values outside 0..255"),
    ("pixel-negative", CSV_HEADER + "\n" + _row(pixel=-1) + "\n", "outside 0..255"),
    ("label-10", CSV_HEADER + "\n" + _row() + "\n" + _row(label=10) + "\n", "label 10 at index 1"),
    ("label-negative", CSV_HEADER + "\n" + _row(label=-1) + "\n", "negative label"),
    ("header-only", CSV_HEADER + "\n", "no data rows"),
    ("not-a-number", CSV_HEADER + "\n" + _row().replace("0", "x", 1) + "\n", "785 integers"),
    ("float", CSV_HEADER + "\n" + _row().replace(",0,", ",0.5,", 1) + "\n", "785 integers"),
]


@pytest.mark.parametrize(("text", "fragment"), [case[1:] for case in BAD_CSV_CASES],
                         ids=[case[0] for case in BAD_CSV_CASES])
def test_bad_csv_gives_format_error(tmp_path, text, fragment):
    path = tmp_path / data.KAGGLE_CSV["train"]
    path.write_text(text, encoding="ascii")
    with pytest.raises(DataFormatError) as excinfo:
        data.read_csv(path)
    message = str(excinfo.value)
    assert fragment in message
    assert str(path) in message and "\n" not in message


def test_bad_csv_through_load_data(tiny_csv_dir):
    (tiny_csv_dir / data.KAGGLE_CSV["test"]).write_text(CSV_HEADER + "\n" + _row(pixel=300) + "\n")
    with pytest.raises(DataFormatError, match=data.KAGGLE_CSV["test"]):
        data.load_data(tiny_csv_dir)


def test_non_ascii_csv_is_format_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(CSV_HEADER.encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataFormatError, match="x.csv"):
        data.read_csv(path)


def test_missing_csv_is_not_found(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nothing.csv"):
        data.read_csv(tmp_path / "nothing.csv")


def test_csv_single_row(tmp_path):
    path = tmp_path / "one.csv"
    (images, labels), _ = make_tiny_arrays(1, 1)
    path.write_text(csv_text(images, labels))
    x, y = data.read_csv(path)
    assert x.shape == (1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.uint8
    np.testing.assert_array_equal(x, images)


# ----------------------------------------------------------------------------------------------- splits
def test_validation_split_is_stratified_seeded_and_disjoint(real):
    (x_train, y_train), _ = real
    index = np.arange(len(y_train))
    (i_fit, y_fit), (i_val, y_val) = data.validation_split(index, y_train, size=5000, seed=0)
    assert len(i_val) == 5000 and len(i_fit) == 55000
    assert np.bincount(y_val, minlength=10).tolist() == [500] * 10
    assert np.bincount(y_fit, minlength=10).tolist() == [5500] * 10
    assert np.intersect1d(i_fit, i_val).size == 0
    assert np.union1d(i_fit, i_val).size == len(y_train)
    np.testing.assert_array_equal(y_train[i_val], y_val)

    (again, _), (again_val, _) = data.validation_split(index, y_train, size=5000, seed=0)
    np.testing.assert_array_equal(again_val, i_val)
    np.testing.assert_array_equal(again, i_fit)
    _, (other_val, _) = data.validation_split(index, y_train, size=5000, seed=1)
    assert not np.array_equal(np.sort(other_val), np.sort(i_val))

    # on the images themselves: dtype and alignment with the labels are kept
    (x_fit, _), (x_val, y_val) = data.validation_split(x_train, y_train, size=0.1, seed=0)
    assert x_val.shape == (6000, 28, 28) and x_val.dtype == np.uint8 and y_val.dtype == np.uint8
    assert x_fit.shape == (54000, 28, 28)
    _, (i_val, _) = data.validation_split(index, y_train, size=0.1, seed=0)
    np.testing.assert_array_equal(x_val, x_train[i_val])
    np.testing.assert_array_equal(y_val, y_train[i_val])


def test_pooled_split_sizes_and_seed(real):
    (x_train, y_train), (x_test, y_test) = real
    (x_a, y_a), (x_b, y_b) = data.pooled_split((x_train, y_train), (x_test, y_test), seed=0)
    assert x_a.shape == (56000, 28, 28) and y_a.shape == (56000,)
    assert x_b.shape == (14000, 28, 28) and y_b.shape == (14000,)
    assert x_a.dtype == np.uint8 and y_b.dtype == np.uint8

    train_index = (np.arange(60000), y_train)
    test_index = (np.arange(60000, 70000), y_test)
    (i_a, _), (i_b, _) = data.pooled_split(train_index, test_index, seed=0)
    assert np.intersect1d(i_a, i_b).size == 0 and np.union1d(i_a, i_b).size == 70000
    assert (i_b >= 60000).any() and (i_b < 60000).any()  # really pooled
    (_, _), (same_b, _) = data.pooled_split(train_index, test_index, seed=0)
    np.testing.assert_array_equal(same_b, i_b)
    (_, _), (other_b, _) = data.pooled_split(train_index, test_index, seed=1)
    assert not np.array_equal(other_b, i_b)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_pooled_split_rejects_bad_fraction(fraction):
    (train, test) = make_tiny_arrays()
    with pytest.raises(ValueError, match="test_fraction"):
        data.pooled_split(train, test, test_fraction=fraction)


def test_validation_split_on_tiny(tiny_arrays):
    (x, y), _ = tiny_arrays
    (x_fit, y_fit), (x_val, y_val) = data.validation_split(x, y, size=10, seed=3)
    assert len(x_val) == 10 and sorted(y_val.tolist()) == list(range(10))
    assert len(x_fit) == 40


# ----------------------------------------------------------------------------------------------- parse_idx property
def _header_dims(blob: bytes) -> tuple[int, ...]:
    ndim = blob[3]
    return struct.unpack(f">{ndim}I", blob[4:4 + 4 * ndim])


@st.composite
def valid_idx(draw) -> bytes:
    ndim = draw(st.sampled_from([1, 3]))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
    body = draw(st.binary(min_size=math.prod(shape), max_size=math.prod(shape)))
    return idx_bytes(np.frombuffer(body, dtype=np.uint8).reshape(shape))


@st.composite
def corrupted_idx(draw) -> bytes:
    blob = bytearray(draw(valid_idx()))
    if draw(st.booleans()):
        blob = blob[:draw(st.integers(0, len(blob)))]
    if blob:
        flips = draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)), max_size=4))
        for position, value in flips:
            blob[position] = value
    return bytes(blob)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=st.one_of(st.binary(max_size=64), valid_idx(), corrupted_idx()))
def test_parse_idx_returns_consistent_array_or_format_error(blob):
    try:
        array = data.parse_idx(blob, "fuzz.idx")
    except DataFormatError as error:
        assert str(error).startswith("fuzz.idx: ")
        return
    dims = _header_dims(blob)
    assert isinstance(array, np.ndarray) and array.dtype == np.uint8
    assert array.shape == dims
    assert array.size == math.prod(dims) == len(blob) - 4 - 4 * len(dims)


def test_parse_idx_round_trip_and_magic_check():
    images = _images(3)
    np.testing.assert_array_equal(data.parse_idx(idx_bytes(images), magic=data.IMAGES_MAGIC), images)
    with pytest.raises(DataFormatError, match="swapped"):
        data.parse_idx(idx_bytes(images), "x", magic=data.LABELS_MAGIC)
def test_parse_idx_huge_dims_do_not_overflow():
    blob = struct.pack(">IIII", data.IMAGES_MAGIC, 2**31, 2**31, 4)
    with pytest.raises(DataFormatError):
        data.parse_idx(blob, "huge.idx")


def test_idx_file_helper_writes_gzip_by_suffix(tmp_path):
    plain = write_idx(tmp_path / "a", _labels(5))
    packed = write_idx(tmp_path / "a.gz", _labels(5))
    assert plain.read_bytes()[:4] == b"\0\0\x08\x01"
    assert packed.read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()
