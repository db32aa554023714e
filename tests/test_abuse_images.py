"""Hostile and extreme uploads: each is refused with one line, or prepared at a cost bounded by its pixel count.

The findings these guard against (issue "Hardening"): a 180-byte 1x100,000 PNG needed a 10 GB square
(fit_to_canvas padded before resizing); an RGBA PNG at the pixel limit cost 1.4-2.2 GB and seconds; an icon was
fully decoded before any size check; Pillow's decompression-bomb warning leaked onto stderr. The worst cases run in
a child process so their peak memory (VmHWM, `fmnist.hardware.peak_rss_mib`) is measured alone; the child's
address space is capped at CHILD_ADDRESS_SPACE, as a container's memory limit would, so an O(side^2) allocation
fails there instead of being lazily mapped by Linux.

Measured on this machine (Pillow 13, numpy 2, Python 3.11, a fresh child process, about 40 MB of it imports):
1x100,000 PNG 41 MB / 0.02 s (before: a 9.3 GiB allocation); 5000x5000 RGBA PNG 231 MB / 0.4-1.3 s (before:
1,447 MB / 5-15 s); 5000x5000 WebP 423 MB / 0.6-1.2 s, the worst allowed format (libwebp's canvas, its copy and the
image all live at once); 5000x5000 progressive JPEG 117 MB / 0.14 s. The bounds below leave about 2x margin.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import tracemalloc
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fmnist import images
from fmnist.errors import ImageError

CHILD_ADDRESS_SPACE = 2 * 1024**3  # bytes; the new code peaks near 0.5 GB of address space at the limit
THIN_LINE_MAX_MB = 200
AT_LIMIT_MAX_MB = 500  # RGBA PNG at the pixel limit: measured 231 MB
WEBP_AT_LIMIT_MAX_MB = 800  # measured 423-432 MB
MAX_SECONDS = 20  # measured at most 2 s; generous for a loaded 2-core machine

CHILD = r"""
import json, resource, sys, time
try:
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
except (ValueError, OSError):
    pass
from fmnist import images
from fmnist.errors import ImageError
start = time.perf_counter()
result = {}
try:
    prepared = images.prepare(sys.argv[1])
    result = {"shape": list(prepared.image.shape), "dtype": str(prepared.image.dtype), "max": int(prepared.image.max())}
except ImageError as error:
    result = {"error": str(error)}
except BaseException as error:
    result = {"crash": f"{type(error).__name__}: {error}"[:300]}
result["seconds"] = time.perf_counter() - start
from fmnist.hardware import peak_rss_mib
result["peak_mb"] = peak_rss_mib()
print(json.dumps(result))
"""


# ----------------------------------------------------------------------------------------------- builders
def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, color_type: int, row: Callable[[int], bytes]) -> bytes:
    """An 8-bit PNG streamed row by row (row(y) gives the pixel bytes), so a huge image costs no memory here."""
    compressor = zlib.compressobj(6)
    data = b"".join(compressor.compress(b"\0" + row(y)) for y in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def line_png(length: int) -> bytes:
    """A 1 x `length` gray PNG: light, with a dark middle third and a dark mark at each end, so the garment's box
    spans the whole line (the square that box was padded to took length^2 bytes)."""
    row = np.full(length, 240, np.uint8)
    row[length // 3: 2 * length // 3] = 20
    row[[1, -2]] = 20
    return png(length, 1, 0, lambda y: row.tobytes())


def rgba_png(width: int, height: int) -> bytes:
    """Opaque light background with a dark half-transparent block: the compositing path runs on every pixel."""
    background = np.tile(np.array([230, 220, 210, 255], np.uint8), width)
    middle = background.reshape(width, 4).copy()
    middle[width // 4: 3 * width // 4] = (20, 30, 40, 128)
    rows = background.tobytes(), middle.tobytes()
    return png(width, height, 6, lambda y: rows[height // 4 <= y < 3 * height // 4])


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height gray pixels but holds almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def lying_ico(inner_side: int) -> bytes:
    """An icon whose directory says 256x256 but which holds an `inner_side`-square RGBA PNG."""
    inner = rgba_png(inner_side, inner_side)
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(inner), 22) + inner


def psd(width: int = 8, height: int = 8) -> bytes:
    """A minimal uncompressed 3-channel Photoshop file."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes(3 * width * height)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def garment(size: tuple[int, int], box: tuple[int, int, int, int], mode: str = "RGB") -> Image.Image:
    """A dark shape on a light background."""
    image = Image.new("RGB", size, (230, 225, 220))
    ImageDraw.Draw(image).rectangle(box, fill=(20, 20, 30))
    return image.convert(mode)


def run_child(path: Path) -> dict:
    """prepare(path) in a fresh interpreter with a capped address space: its result, seconds and peak RSS (MB)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(CHILD_ADDRESS_SPACE)], capture_output=True,
                          text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_one_line(error: ImageError | str, *needles: str) -> None:
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    for needle in needles:
        assert needle in message, message


def assert_sensible(result: dict) -> None:
    """A 28x28 uint8 image or a one-line refusal; never a crash."""
    assert "crash" not in result, result
    if "error" in result:
        assert_one_line(result["error"])
    else:
        assert result["shape"] == [28, 28] and result["dtype"] == "uint8", result


# ----------------------------------------------------------------------------------------------- H1: thin images
@pytest.mark.parametrize("length", [100_000, 60_000])
def test_thin_png_costs_its_pixels_not_its_side_squared(tmp_path, length):
    """180 bytes, 1 x 100,000 pixels: once a 10 GB square (a MemoryError under a container's limit)."""
    path = tmp_path / f"line-{length}.png"
    path.write_bytes(line_png(length))
    assert path.stat().st_size < 200
    result = run_child(path)
    assert_sensible(result)
    assert result["peak_mb"] < THIN_LINE_MAX_MB, result
    assert result["seconds"] < MAX_SECONDS, result


def test_fit_to_canvas_of_a_two_megapixel_line_is_cheap():
    """Padding to a square first would need 2,000,000^2 bytes (3.6 TiB); resizing first needs the line itself."""
    line = np.full((1, 2_000_000), 255, np.uint8)
    resized = images.fit_to_canvas(line)
    assert resized.shape == (28, 28) and resized.dtype == np.uint8
    tall = images.fit_to_canvas(np.full((2_000_000, 3), 255, np.uint8))
    assert tall.shape == (28, 28)


def fit_by_padding(gray: np.ndarray, size: int = 28) -> np.ndarray:
    """The recipe fit_to_canvas must reproduce: centre on a black square of the long side, resize the square."""
    height, width = gray.shape
    side = max(height, width)
    square = np.zeros((side, side), np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = gray
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0))


def test_fit_to_canvas_gives_the_same_pixels_as_padding_to_a_square():
    """Resizing first must not change results for ordinary crops: bit for bit the same as the square recipe."""
    rng = np.random.default_rng(3)
    for trial in range(60):
        height, width = (int(value) for value in rng.integers(1, 900, size=2))
        if trial % 4 == 0:
            height = int(rng.integers(1, 30))
        gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
        np.testing.assert_array_equal(images.fit_to_canvas(gray), fit_by_padding(gray), err_msg=f"{height}x{width}")


# ----------------------------------------------------------------------------------------------- M1: cost at the limit
def test_default_limit_is_a_phone_photo():
    """24 MP (iPhone 15/16, 5712x4284) is the largest default phone photo; 40 MP let a 1.7 GB decode through."""
    assert 5712 * 4284 <= images.DEFAULT_MAX_PIXELS <= 30_000_000


def test_rgba_png_at_the_pixel_limit_is_cheap(tmp_path):
    width = 5000
    height = images.DEFAULT_MAX_PIXELS // width
    path = tmp_path / "at-limit.png"
    path.write_bytes(rgba_png(width, height))
    assert path.stat().st_size < 1_000_000
    result = run_child(path)
    assert "shape" in result, result  # a real picture at the limit is prepared, not refused
    assert_sensible(result)
    assert result["peak_mb"] < AT_LIMIT_MAX_MB, result
    assert result["seconds"] < MAX_SECONDS, result
    over = tmp_path / "over-limit.png"
    over.write_bytes(rgba_png(width, height + 1))
    with pytest.raises(ImageError) as caught:
        images.prepare(over)
    assert_one_line(caught.value, "over the limit", f"{images.DEFAULT_MAX_PIXELS:,}", "resize")


def test_webp_at_the_pixel_limit_stays_bounded(tmp_path):
    """The costliest allowed format: libwebp decodes into its own canvas, which Pillow copies."""
    side = int(images.DEFAULT_MAX_PIXELS ** 0.5)
    path = tmp_path / "at-limit.webp"
    path.write_bytes(encode(garment((side, side), (side // 4, side // 4, 3 * side // 4, 3 * side // 4), "RGBA"),
                            "WEBP", quality=50, method=0))
    result = run_child(path)
    assert "shape" in result, result
    assert result["peak_mb"] < WEBP_AT_LIMIT_MAX_MB, result


def test_large_jpeg_is_decoded_at_reduced_scale_and_kept_small():
    """libjpeg decodes a 3000x2200 photo at half size; what prepare() keeps is at most WORK_SIDE a side."""
    payload = encode(garment((3000, 2200), (900, 500, 2100, 1700)), "JPEG", quality=85)
    assert images.load_image(payload).size == (3000, 2200)
    assert images.load_image(payload, draft_side=1024).size == (1500, 1100)
    prepared = images.prepare(payload)
    assert max(prepared.original.size) <= images.WORK_SIDE
    assert all(max(step.shape) <= images.WORK_SIDE for step in prepared.steps.values())
    assert prepared.inverted and prepared.image.max() == 255


def test_large_png_keeps_only_small_copies():
    prepared = images.prepare(encode(garment((2600, 1800), (800, 400, 1800, 1400), "RGBA"), "PNG", compress_level=1))
    assert max(prepared.original.size) <= images.WORK_SIDE and prepared.original.mode == "RGBA"
    assert max(prepared.steps["gray"].shape) <= images.WORK_SIDE


# ----------------------------------------------------------------------------------------------- M2: formats
@pytest.mark.parametrize(("kind", "build"), [
    ("ICO", lambda: lying_ico(3000)),
    ("ICO", lambda: encode(garment((64, 64), (16, 16, 47, 47)), "ICO")),
    ("PCX", lambda: encode(garment((300, 200), (100, 50, 199, 149)), "PCX")),
    ("PSD", psd),
    ("TGA", None),
], ids=["lying-ico", "ico", "pcx", "psd", "tga"])
def test_formats_off_the_list_are_refused_before_decoding(tmp_path, kind, build):
    payload = build() if build else encode(garment((300, 200), (100, 50, 199, 149)), "TGA")
    path = tmp_path / f"upload.{kind.lower()}"
    path.write_bytes(payload)
    with pytest.raises(ImageError) as caught:
        images.prepare(path)
    assert_one_line(caught.value, str(path), "not an", "PNG", "JPEG")
    if build is not None:  # TGA has no magic number: it is named only when its header happens to resemble one
        assert f"not an accepted image format (its header looks like {kind})" in str(caught.value)


def test_the_allowed_formats_are_the_six_the_readme_names():
    assert set(images.ALLOWED_FORMATS) == {"PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"}


@pytest.mark.parametrize("side", [10_000, 20_000], ids=["pillow-warns", "pillow-refuses"])
def test_pillows_bomb_check_stays_quiet_and_local(side):
    """Over 89 MP Pillow warns on stderr; that must become our one-line refusal without touching global filters."""
    filters, limit = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        with pytest.raises(ImageError) as caught:
            images.load_image(png_header(side, side), name="bomb.png")
    assert_one_line(caught.value, "bomb.png: the image is", "over the limit")
    assert not [w for w in caught_warnings if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == filters and limit == Image.MAX_IMAGE_PIXELS


def test_bomb_check_from_many_threads_leaves_the_warning_filters_alone():
    filters = list(warnings.filters)
    errors: list[str] = []

    def load() -> None:
        for _ in range(20):
            try:
                images.load_image(png_header(10_000, 10_000), name="bomb.png")
            except ImageError as error:
                errors.append(str(error))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 80 and warnings.filters == filters


@pytest.mark.parametrize(("name", "payload"), [
    ("huge.bmp", b"BM" + struct.pack("<IHHIIiiHHIIiiII", 0, 0, 0, 54, 40, 7_000, 5_000, 1, 24, 0, 0, 0, 0, 0, 0)),
    ("huge.png", png_header(8_000, 4_000)),
], ids=["bmp", "png"])
def test_header_claiming_a_huge_size_is_refused_before_decoding(name, payload):
    """35 and 32 MP with no pixel data: refused from the header by the size, not later as a truncated file."""
    with pytest.raises(ImageError) as caught:
        images.load_image(payload, name=name)
    assert_one_line(caught.value, f"{name}: the image is", "over the limit")


def test_gif_frame_larger_than_its_screen_is_checked():
    """A GIF's first frame may be larger than the screen its header declares; the enlarged size is what counts."""
    gif = bytearray(encode(Image.new("P", (16, 16)), "GIF"))
    struct.pack_into("<HH", gif, gif.index(b"\x2c") + 5, 6_000, 6_000)
    with pytest.raises(ImageError) as caught:
        images.load_image(bytes(gif), name="frame.gif")
    assert_one_line(caught.value, "6000x6000", "over the limit")


# ----------------------------------------------------------------------------------------------- frames, bad files
def two_frames(fmt: str) -> bytes:
    """A wide bar, then a tall bar: only the wide one may be used."""
    wide = garment((300, 300), (30, 120, 269, 179))
    tall = garment((300, 300), (120, 30, 179, 269))
    if fmt == "GIF":
        wide, tall = wide.convert("P"), tall.convert("P")
    return encode(wide, fmt, save_all=True, append_images=[tall] * 30)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP", "PNG"])
def test_multi_frame_images_use_only_the_first_frame(monkeypatch, fmt):
    """31 frames: none but the first is ever sought (decoding them all would multiply the cost)."""
    payload = two_frames(fmt)
    plugin = type(Image.open(io.BytesIO(payload)))
    real_seek, seeks = plugin.seek, []

    def spy(self, frame):
        seeks.append(frame)
        return real_seek(self, frame)

    monkeypatch.setattr(plugin, "seek", spy)
    prepared = images.prepare(payload)
    assert not [frame for frame in seeks if frame > 0], seeks
    rows = np.flatnonzero((prepared.image > 64).any(axis=1))
    assert rows[-1] - rows[0] + 1 < 10  # the wide bar of the first frame


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_truncated_files_are_refused_in_one_line(fmt):
    payload = encode(garment((300, 200), (100, 50, 199, 149), "P" if fmt == "GIF" else "RGB"), fmt)
    with pytest.raises(ImageError) as caught:
        images.prepare(payload[: len(payload) // 2], name=f"cut.{fmt.lower()}")
    assert_one_line(caught.value, f"cut.{fmt.lower()}: ", "truncated or corrupt")


@pytest.mark.parametrize("payload", [b"<html><body>not an image</body></html>", bytes(range(256)) * 40,
                                     b"\x89PNG\r\n\x1a\n" + b"\0" * 64], ids=["html", "noise", "png-magic-only"])
def test_non_images_are_refused_in_one_line(payload):
    with pytest.raises(ImageError) as caught:
        images.prepare(payload, name="upload.png")
    assert_one_line(caught.value, "upload.png: not an image")


def test_a_huge_non_image_file_is_refused_from_its_first_bytes(tmp_path):
    """A path is opened and read lazily: a 64 MB non-image is refused without being read into memory."""
    path = tmp_path / "notes.png"
    with path.open("wb") as handle:
        handle.write(b"these are notes, not a picture\n")
        handle.truncate(64 * 1024**2)  # sparse: 64 MB that cost nothing to write
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as caught:
            images.prepare(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line(caught.value, str(path), "not an image")
    assert peak < 8 * 1024**2, peak


def test_header_size_reads_only_the_header_of_allowed_formats():
    """What a memory budget (the service's) should count: the declared size, for the formats load_image opens."""
    assert images.header_size(io.BytesIO(png_header(300, 200))) == (300, 200)
    assert images.header_size(io.BytesIO(psd())) is None
    assert images.header_size(io.BytesIO(lying_ico(64))) is None
    stream = io.BytesIO(b"plain text")
    assert images.header_size(stream) is None and stream.tell() == 0
