"""Turning an arbitrary photo into a Fashion-MNIST-like 28x28 input, with bounded cost.

The dataset was made from product photos: trimmed, longest edge resized to 28, padded and centred, negated (light
garment on black), 8-bit gray. A user's photo is the opposite (a dark garment on a light background, off-centre, in
colour, maybe rotated by EXIF, lit unevenly, noisy), so `prepare()` repeats the dataset's recipe step by step:

    load -> gray -> shrink -> flatten the background (black and even, light garment) -> trim
    -> [straighten, when asked: turn upright and trim again] -> fit to 28x28 -> sharpen -> match intensity

See docs/photos.md for what each step buys on phone-like photos (benchmarks/photos.py).

Every step is a small public function so a page or a notebook can show the intermediate images. Every problem
with an image raises `ImageError` with one line that names the file, the problem and the fix.

Cost is bounded by the pixel count the header declares, never by a side squared: only six formats are opened
(`ALLOWED_FORMATS`), the size is checked from the header before any pixel is decoded, only the first frame of an
animation is decoded, a large JPEG is decoded at 1/2, 1/4 or 1/8 scale, the photo is made 8-bit gray before the
float work (done a million pixels at a time) and shrunk to at most `WORK_SIDE` pixels a side right after.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from fmnist.errors import ImageError

SIZE = 28
# The largest photo a phone saves by default: 24 MP (iPhone 15/16, 5712x4284 = 24.5 MP); Pixel and Galaxy phones
# save 12-12.5 MP unless a 50-200 MP mode is chosen. 25 MP is also `fmnist serve --max-pixels`' default, so the CLI
# and the service accept the same photos. Measured at this limit, peak RSS of a fresh process (40 MB of it imports):
# RGBA PNG 231 MB / 0.4-1.3 s (was 1,447 MB / 5-15 s), float TIFF 188 MB, progressive JPEG 117 MB, WebP 423 MB
# (the worst: libwebp's canvas, Pillow's copy and the image are alive at once). See tests/test_abuse_images.py.
DEFAULT_MAX_PIXELS = 25_000_000
# The long side the pipeline works at. The garment ends up 28 pixels long, so 1024 leaves 9x oversampling even for
# a garment a quarter of the photo wide; a 12 MP photo is shrunk 4x, which changes its 28x28 result by about one
# gray level, and photos up to 1024 pixels a side are not shrunk at all (unchanged results).
WORK_SIDE = 1024
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")  # Pillow's format ids; JPEG includes MPO photos
# A garment must stand out from the background by at least this many gray levels: JPEG noise on a plain
# background is a few levels, so anything weaker is treated as an empty photo rather than stretched into noise.
MIN_CONTRAST = 24
# With noise, a pixel is garment only when it stands out by this many noise levels (the spread of the border around
# the fitted background, measured after a 3x3 mean): at 4, noise alone passes for about 1 pixel in 30,000, too few to
# fill the few pixels per row or column that `trim` asks for.
NOISE_LEVELS = 4.0
# The background's light is fitted to at most this many border pixels, taken evenly: six numbers need no more, and the
# fit then costs the same for any photo.
_SURFACE_SAMPLES = 8192
# Below this short side the border frame is a pixel wide and next to the garment: one level (the median) is safer.
_SURFACE_MIN_SIDE = 32
# A spread under one gray level is the rounding of a clean image to integers, not noise: such a photo keeps the
# noiseless path (no coring, no 3x3 mean before trimming), exactly as before noise was measured.
_NOISE_FLOOR = 1.0
# straighten: garments are photographed roughly upright; tilts up to this many degrees are searched, in 0.25 steps,
# and one under the smaller angle is left alone (not worth a resampling).
STRAIGHTEN_MAX_DEGREES = 10.0
_STRAIGHTEN_STEP = 0.25
_STRAIGHTEN_MIN_DEGREES = 0.5
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"
# sharpen: an unsharp mask of radius 1 at full strength, as the dataset's own recipe sharpened after resizing
# ("a Gaussian operator of radius and standard deviation 1.0"); chosen on photos of training images (docs/photos.md)
SHARPEN = ImageFilter.UnsharpMask(radius=1, percent=100, threshold=0)
_REDUCING_GAP = 3.0  # fit_to_canvas: box-reduce first until the last LANCZOS step shrinks at most 3x (Pillow's rule)
_CHUNK = 1 << 20  # float64 work on a million pixels at a time: 8 MB per temporary instead of 8 bytes x pixels
# Image.open warns about a decompression bomb (over 89 MP, refused by us anyway) through the process-wide warnings
# filters; this lock keeps two of our threads from interleaving catch_warnings, which could leave a filter behind.
_OPEN_LOCK = threading.Lock()
_BROKEN = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, ZeroDivisionError,
           OverflowError)  # what Pillow's decoders raise on malformed files

Source = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | np.ndarray | Image.Image


@dataclass(frozen=True)
class Prepared:
    """The model input plus what led to it: the loaded photo and each intermediate image, for display.

    `steps` holds "gray", "inverted" (already with a black background), "trimmed", "resized", "sharpened" and
    "final"; an input that passed through unchanged (already in dataset form) has only "gray" and "final".
    `original` and the steps of a photo larger than `WORK_SIDE` are shrunk to at most `WORK_SIDE` pixels a side,
    so a result stays small.
    """

    image: np.ndarray = field(repr=False)  # (28, 28) uint8, light garment on black
    original: Image.Image = field(repr=False)
    steps: dict[str, np.ndarray] = field(repr=False)
    inverted: bool
    passthrough: bool
    name: str


# ----------------------------------------------------------------------------------------------- loading
def load_image(source: str | os.PathLike | bytes | BinaryIO, *, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, draft_side: int | None = None) -> Image.Image:
    """Read a path, bytes or file object into a Pillow image, upright as the camera meant it (EXIF).

    Only `ALLOWED_FORMATS` are opened and only the first frame is decoded; the pixel limit is checked from the
    header, before any pixel is decoded; the frame is then decoded fully, so a truncated upload fails now with a
    clear message instead of later with a half-gray picture. With `draft_side`, a JPEG larger than twice that is
    decoded at 1/2, 1/4 or 1/8 scale, keeping at least `draft_side` pixels on its long side (libjpeg scales while
    decoding: a 24 MP photo then costs what a 1.5 MP one does).
    """
    label = _label(source, name)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{label}: no such file; check the path")
        if not path.is_file():
            raise ImageError(f"{label}: not a regular file; pass an image file")
        try:
            with path.open("rb") as handle:  # read lazily: a huge non-image is refused from its first bytes
                if os.fstat(handle.fileno()).st_size == 0:
                    raise ImageError(f"{label}: the file is empty; upload the image again")
                return _decode(handle, label, max_pixels, draft_side)
        except OSError as error:
            raise ImageError(f"{label}: cannot read the file ({error.strerror or error}); check its permissions") \
                from None
    return _decode(io.BytesIO(_payload(source, label)), label, max_pixels, draft_side)


def header_size(stream: BinaryIO) -> tuple[int, int] | None:
    """Width and height an upload's header declares, no pixel decoded; None when it is not an allowed image.

    For a caller that budgets memory before decoding (the service): the same formats and the same quiet bomb
    check as `load_image`, so the budget sees what will be decoded. The stream is rewound.
    """
    try:
        return _open(stream).size
    except Exception:  # unreadable, another format, or over Pillow's limit: load_image says which, in one line
        return None
    finally:
        stream.seek(0)


def _payload(source: object, label: str) -> bytes:
    """The bytes of an in-memory or file-object source (read from its current position, as a caller expects)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        payload = bytes(source)
    elif hasattr(source, "read"):
        payload = source.read()
        if not isinstance(payload, bytes):
            raise ImageError(f"{label}: the file object returned text; open the image in binary mode ('rb')")
    else:
        raise ImageError(f"{label}: cannot read an image from {type(source).__name__}; "
                         "pass a path, bytes, a binary file or a numpy array")
    if not payload:
        raise ImageError(f"{label}: the file is empty; upload the image again")
    return payload


def _decode(stream: BinaryIO, label: str, max_pixels: int, draft_side: int | None) -> Image.Image:
    """Open (allowed formats only), check the header's size, then decode the first frame and apply EXIF."""
    try:
        image = _open(stream)
        width, height = image.size
        if width == 0 or height == 0:
            raise ImageError(f"{label}: the image is {width}x{height} pixels; it has no pixels to read")
        if width * height > max_pixels:
            raise _too_large(label, width, height, max_pixels)
        if draft_side and image.format in ("JPEG", "MPO") and max(width, height) >= 2 * draft_side:
            scale = draft_side / max(width, height)
            image.draft(image.mode, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
        image.load()  # the current frame only: the first, as opened; other frames are never decoded
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # over Pillow's own limit (89 MP)
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        raise ImageError(f"{label}: the image is too large to decode safely, over the limit of {limit:,} pixels; "
                         "resize it before uploading") from None
    except UnidentifiedImageError:
        raise ImageError(_unidentified(stream, label)) from None
    except _BROKEN as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise ImageError(f"{label}: the image cannot be decoded ({detail}); the file is truncated or corrupt, "
                         "save or download it again") from None
    except MemoryError:  # a tight container: still one line and a 4xx, not a traceback or a 500
        raise ImageError(f"{label}: not enough memory to decode the image; resize it before uploading") from None
    _upright(image)
    return image


def _open(stream: BinaryIO) -> Image.Image:
    """`Image.open` limited to `ALLOWED_FORMATS`, with Pillow's bomb warning raised as an error for this call only.

    Pillow warns (instead of refusing) between 89 and 179 megapixels; our own limit refuses those anyway, so the
    warning would only add a multi-line message to the CLI's one-line error. Nothing is changed process-wide.
    """
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(stream, formats=ALLOWED_FORMATS)


def _unidentified(stream: BinaryIO, label: str) -> str:
    """Why Pillow found no allowed format: another image format, or not an image.

    The other format is named from the 16-byte prefix only (hedged: some magic numbers are shared, a TGA can
    look like a cursor), so nothing of it is parsed or decoded.
    """
    stream.seek(0)
    prefix = stream.read(16)
    Image.init()
    for kind, (_, accept) in Image.OPEN.items():
        try:
            matched = accept is not None and accept(prefix) is True
        except Exception:  # an exotic plugin's header test must not turn a refusal into a crash
            matched = False
        if matched and kind in ALLOWED_FORMATS:
            return f"{label}: not an image: its {kind} header is invalid; save or download it again"
        if matched:
            return (f"{label}: not an accepted image format (its header looks like {kind}); convert it to PNG or "
                    f"JPEG ({_FORMATS} are read)")
    return f"{label}: not an image (or not one of the accepted formats); use {_FORMATS}"


def _label(source: object, name: str | None) -> str:
    """How messages name the input: the caller's name, else the path, the file object's name, or a placeholder."""
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(getattr(source, "name", None), str):
        return source.name
    if isinstance(source, np.ndarray):
        return "<array>"
    return "<image>" if isinstance(source, Image.Image) else "<bytes>"


def _too_large(label: str, width: int, height: int, max_pixels: int) -> ImageError:
    return ImageError(f"{label}: the image is {width}x{height} = {width * height:,} pixels, over the limit of "
                      f"{max_pixels:,}; resize it before uploading")


def _upright(image: Image.Image) -> None:
    """Apply the EXIF orientation in place (phones store photos sideways and set a tag); a broken tag is ignored.

    In place: without a tag the copying version would duplicate the whole decoded image for nothing.
    """
    with contextlib.suppress(Exception):  # a malformed EXIF block must not cost the prediction: keep the pixels
        ImageOps.exif_transpose(image, in_place=True)


def shrink(gray: np.ndarray, side: int = WORK_SIDE) -> np.ndarray:
    """Box-average a gray image by a whole factor until its long side is at most `side`.

    Everything after this costs what a 1 MP image does, whatever the photo's size; 28x28 needs no more.
    """
    factor = math.ceil(max(gray.shape) / side)
    return np.asarray(Image.fromarray(gray).reduce(factor)) if factor > 1 else gray


def _for_display(image: Image.Image, side: int = WORK_SIDE) -> Image.Image:
    """A copy at most `side` pixels a side to keep as `Prepared.original` (the full photo is let go)."""
    factor = math.ceil(max(image.size) / side)
    if factor <= 1:
        return image
    try:
        if image.mode in ("P", "1", "LA", "RGBA", "PA") or image.mode.startswith("I;16"):
            # reduce() cannot average palettes and would make a full-size premultiplied copy of RGBA first
            return image.resize((math.ceil(image.width / factor), math.ceil(image.height / factor)),
                                Image.Resampling.NEAREST)
        return image.reduce(factor)
    except (ValueError, OSError):  # an exotic mode neither can handle: keep the photo as it is
        return image


# ----------------------------------------------------------------------------------------------- steps
def _border(gray: np.ndarray, width: int | None = None) -> np.ndarray:
    """The pixels of a frame a few pixels wide (about 3% of the short side) around the image."""
    height, width_px = gray.shape
    width = width or max(1, min(height, width_px) // 32)
    if 2 * width >= min(height, width_px):
        return gray.ravel()
    return np.concatenate([gray[:width].ravel(), gray[-width:].ravel(),
                           gray[width:-width, :width].ravel(), gray[width:-width, -width:].ravel()])


def _chunked(arrays: tuple[np.ndarray, ...], function: Callable[..., np.ndarray]) -> np.ndarray:
    """`function` applied elementwise to same-shaped arrays a million values at a time, as uint8.

    The same arithmetic as on the whole arrays, so the same result, but float64 temporaries of a 25 MP image would
    take 200 MB each; per chunk they take 8 MB.
    """
    flats = [np.ravel(array) for array in arrays]
    out = np.empty(flats[0].size, np.uint8)
    for start in range(0, out.size, _CHUNK):
        out[start:start + _CHUNK] = function(*(flat[start:start + _CHUNK] for flat in flats))
    return out.reshape(arrays[0].shape)


def _value_range(values: np.ndarray, clean: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
    """min and max of `clean(values)`, a chunk at a time (see `_chunked`)."""
    flat = np.ravel(values)
    if flat.size == 0:
        return 0.0, 0.0
    parts = [clean(flat[start:start + _CHUNK]) for start in range(0, flat.size, _CHUNK)]
    return min(float(part.min()) for part in parts), max(float(part.max()) for part in parts)


def _finite(values: np.ndarray) -> np.ndarray:
    """As float64 with NaN and infinities made 0."""
    return np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _extremes(values: np.ndarray) -> np.ndarray:
    """As float64 with NaN made 0 and infinities the largest floats (how I and F images were always read)."""
    return np.nan_to_num(values.astype(np.float64))


def _scaled(values: np.ndarray, low: float, factor: float, clean: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.clip(np.rint((clean(values) - low) * factor), 0, 255)


def _to_uint8(values: np.ndarray, full_scale: float | None,
              clean: Callable[[np.ndarray], np.ndarray] = _finite) -> np.ndarray:
    """Scale numbers whose white is `full_scale` to 0..255; without a known scale, stretch min..max.

    `clean` turns a chunk into finite float64 (by default NaN and infinities become 0).
    """
    low = 0.0
    if full_scale is None:
        low, high = _value_range(values, clean)
        full_scale = (high - low) or 1.0
    factor = 255.0 / full_scale
    return _chunked((values,), lambda chunk: _scaled(chunk, low, factor, clean))


def _bands(image: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """The image's rows as arrays, about a million pixels at a time (np.asarray of a whole image copies it twice)."""
    rows = max(1, _CHUNK // max(1, image.width))
    for top in range(0, image.height, rows):
        yield top, np.asarray(image.crop((0, top, image.width, min(top + rows, image.height))))


def _numeric_to_gray(image: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer and float images as uint8, a band of rows at a time (see `to_grayscale`)."""
    clean, low, full_scale = _finite, 0.0, 65535.0  # 16-bit: white is 65535
    if image.mode in ("I", "F"):
        clean = _extremes
        ranges = [_value_range(band, clean) for _, band in _bands(image)]
        low, high = min(part[0] for part in ranges), max(part[1] for part in ranges)
        if image.mode == "F" and low >= 0 and high <= 1:
            low, full_scale = 0.0, 1.0
        elif low >= 0 and high <= 255:
            low, full_scale = 0.0, 255.0
        elif low >= 0 and high <= 65535:
            low, full_scale = 0.0, 65535.0
        else:  # no known white: stretch min..max
            full_scale = (high - low) or 1.0
    factor = 255.0 / full_scale
    out = np.empty((image.height, image.width), np.uint8)
    for top, band in _bands(image):
        out[top:top + band.shape[0]] = _scaled(band, low, factor, clean)
    return out


def _transparent_background(gray: np.ndarray, alpha: np.ndarray) -> float:
    """The gray to put behind transparent pixels.

    When most of the border is opaque, the photo has a background: use its median. A cut-out (sticker-like)
    garment has a transparent border; no colour is "the" background then, so choose the one the garment contrasts
    with most: white behind a dark garment, black behind a light one.
    """
    border, border_alpha = _border(gray), _border(alpha)
    opaque = border_alpha >= 128
    if opaque.mean() >= 0.5:
        return float(np.median(border[opaque]))
    garment = gray[alpha >= 128]
    if garment.size == 0:
        return 0.0
    return 255.0 if np.median(garment) < 128 else 0.0


def _gray_and_alpha(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """8-bit gray and alpha of an image with transparency, without copying an RGBA image that is one already."""
    if image.mode == "LA":
        return np.asarray(image.getchannel(0)), np.asarray(image.getchannel("A"))
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    return np.asarray(rgba.convert("L")), np.asarray(rgba.getchannel("A"))


def _composite(image: Image.Image) -> np.ndarray:
    """Gray with transparent pixels blended onto the background chosen by `_transparent_background`."""
    gray, alpha = _gray_and_alpha(image)
    if alpha.min() == 255:
        return gray
    background = _transparent_background(gray, alpha)

    def blend(gray_chunk: np.ndarray, alpha_chunk: np.ndarray) -> np.ndarray:
        opacity = alpha_chunk / 255.0
        return np.clip(np.rint(gray_chunk.astype(np.float64) * opacity + background * (1 - opacity)), 0, 255)

    return _chunked((gray, alpha), blend)


def to_grayscale(image: Image.Image) -> np.ndarray:
    """Any Pillow image as (H, W) uint8 gray, because the dataset is 8-bit gray.

    16-bit images are scaled (65535 -> 255) rather than clipped; float images in 0..1 are scaled by 255;
    transparency is composited onto a background chosen by `_transparent_background`. Memory stays near the
    decoded image's own size: no float64 copy of the whole image, no RGB copy of an RGB image.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return _numeric_to_gray(image)
    try:
        if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
            return _composite(image)
        if mode in ("L", "1", "P", "RGB"):
            return np.asarray(image.convert("L"))
        return np.asarray(image.convert("RGB").convert("L"))
    except (ValueError, OSError) as error:
        raise ImageError(f"cannot convert a {mode} image to gray ({error}); save it as RGB or grayscale") from None


def border_is_light(gray: np.ndarray) -> bool:
    """Whether the background (the median of the border) is the light part of this image.

    Compared with the middle of the image's own range rather than with 128, so a black garment on a mid-gray
    table counts as "light background" too.
    """
    low, high = np.percentile(gray, [1, 99])
    return bool(np.median(_border(gray)) > (low + high) / 2)


def _frame(shape: tuple[int, int]) -> np.ndarray:
    """Where `_border`'s frame lies, as a boolean mask: the surface fit needs the positions of its pixels."""
    height, width = shape
    side = max(1, min(height, width) // 32)
    frame = np.ones(shape, bool)
    if 2 * side < min(height, width):
        frame[side:-side, side:-side] = False
    return frame


def _spread(values: np.ndarray) -> float:
    """A robust standard deviation (1.4826 x the median absolute deviation): a garment touching the border, or a
    speck, does not inflate it the way it would the plain standard deviation."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values)))) if values.size else 0.0


def _quadratic(coefficients: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """c0 + c1 x + c2 y + c3 x^2 + c4 y^2 + c5 xy: a gradient in any direction plus a vignette (light falling off
    towards the edges, or a lamp's hot spot), the shapes of uneven light over a photo."""
    c = coefficients
    return c[0] + c[1] * x + c[2] * y + c[3] * x * x + c[4] * y * y + c[5] * x * y


def _fit_surface(x: np.ndarray, y: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Least squares of `_quadratic` through border samples at x, y (-1..1): its coefficients, its values at the
    samples kept, and the noise (spread of those samples around it); None when most samples do not fit.

    Refitted twice without the samples more than 3 noise levels off, so a garment that touches the border (a
    sleeve, a strap) does not tilt the surface. Six normal equations: the cost is that of the samples.
    """
    design = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=1)
    keep = np.ones(values.size, bool)
    coefficients, noise = np.zeros(6), 0.0
    for _ in range(3):
        chosen = design[keep]
        normal = chosen.T @ chosen + 1e-6 * np.eye(6)  # the ridge only keeps a degenerate frame solvable
        coefficients = np.linalg.solve(normal, chosen.T @ values[keep])
        residual = values - design @ coefficients
        noise = _spread(residual[keep])
        keep = np.abs(residual) <= max(3 * noise, 2.0)
        if keep.mean() < 0.5:
            return None
    return coefficients, design[keep] @ coefficients, noise


def background_surface(gray: np.ndarray) -> tuple[np.ndarray, float]:
    """The background's gray level at every pixel (float32), fitted to the border, and the noise around it.

    A phone photo's background is rarely one level: light from a window falls off across it, the lens darkens the
    corners, so subtracting one level leaves one side gray, which `trim` then takes for garment and the model sees
    as a haze. A smooth surface (`_quadratic`) fitted to the border follows the light instead. Its reach inside the
    photo is clipped to the border's own range widened by that range again (a vignette's bright centre is about
    that far above its border), so a poor fit cannot run away. Small images use the border median, as before.
    """
    height, width = gray.shape
    rows, cols = np.nonzero(_frame(gray.shape))
    step = -(-rows.size // _SURFACE_SAMPLES)
    rows, cols = rows[::step], cols[::step]
    values = gray[rows, cols].astype(np.float64)
    fit = None
    if min(height, width) >= _SURFACE_MIN_SIDE:
        fit = _fit_surface(cols / (width - 1) * 2 - 1, rows / (height - 1) * 2 - 1, values)
    if fit is None:
        level = float(np.median(values))
        return np.full(gray.shape, level, np.float32), _spread(values)
    coefficients, fitted, noise = fit
    x = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    surface = _quadratic(coefficients.astype(np.float32), x, y)
    low, high = float(fitted.min()), float(fitted.max())
    reach = high - low + 2 * noise
    return np.clip(surface, low - reach, high + reach).astype(np.float32), noise


def garment_is_darker(gray: np.ndarray, surface: np.ndarray, noise: float) -> bool:
    """Whether the garment is darker than the background around it (so the photo needs negating).

    `border_is_light` compares the border with the middle of the image's range, and a vignette or a gradient can
    darken a light background's border below the middle of a faint garment's range: the photo was then not
    negated and came out blank (1 of 2,000 photos in benchmarks/photos.py). Against the fitted background
    (`background_surface`) a garment stands out below it or above it; the side holding more contrast wins.
    """
    deviation = gray - surface
    level = max(3 * noise, 2.0)
    below = float(np.clip(-deviation - level, 0, None).sum())
    above = float(np.clip(deviation - level, 0, None).sum())
    return below > above


def flatten_background(gray: np.ndarray, light: bool | None = None) -> tuple[np.ndarray, bool, float]:
    """The photo as the dataset holds it, a light garment on an even black; whether it was negated; its noise level
    in the result's units.

    A photo is light times reflectance. On a light background (`light`, by default `garment_is_darker`) the garment
    is 255 x (1 - photo / background): its darkness against what the background would be at that spot, so a
    gradient, a vignette or coloured light (which scale background and garment alike) cancel, and the background
    is 0 wherever it lies. On a dark background the garment is the light part: the surface is subtracted. Last,
    the noise level is subtracted (coring): otherwise the half of the background's noise above the surface
    survives the clip at 0 as a haze, about 0.4 noise levels, that no later step removes. A photo whose spread is
    under `_NOISE_FLOOR` counts as noiseless (noise 0).
    """
    surface, noise = background_surface(gray)
    noise = noise if noise >= _NOISE_FLOOR else 0.0
    light = garment_is_darker(gray, surface, noise) if light is None else light
    if light:
        np.maximum(surface, 1.0, out=surface)
        flat = 255.0 * (surface - gray) / surface
        noise *= 255.0 / float(surface.mean())
    else:
        flat = gray - surface
    flat -= noise
    return np.clip(np.rint(flat), 0, 255).astype(np.uint8), light, noise


def _garment_mask(gray: np.ndarray, level: float, noise: float) -> np.ndarray:
    """Pixels above `level`, and above `NOISE_LEVELS` x `noise` measured on a 3x3 mean when there is noise.

    The 3x3 mean divides independent noise by 3 and moves an edge by a pixel (a few hundredths of a final pixel),
    so noise stops passing for garment without raising the threshold into the garment's faint parts.
    """
    if noise <= 0:
        return gray > level
    smooth = np.asarray(Image.fromarray(gray).filter(ImageFilter.BoxBlur(1)))
    return smooth > max(level, NOISE_LEVELS * noise / 3)


def _tilt(mask: np.ndarray) -> float:
    """The angle (degrees, Pillow's sense) that turns the garment upright: the one whose bounding box is smallest.

    Dataset garments are upright and trimmed to their box: trouser legs, sides, hems and soles run along the axes,
    and any tilt makes the box larger. Only each row's outermost pixels are turned (a shape's box is that of its
    convex hull, whose corners are among them), so each of the 81 angles costs a pass over a few thousand points.
    A tie goes to the smaller turn.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size < 8:
        return 0.0
    inside = mask[rows]
    left = inside.argmax(axis=1)
    right = inside.shape[1] - 1 - inside[:, ::-1].argmax(axis=1)
    y = np.concatenate([rows, rows]).astype(np.float64)
    x = np.concatenate([left, right]).astype(np.float64)
    degrees = np.arange(-STRAIGHTEN_MAX_DEGREES, STRAIGHTEN_MAX_DEGREES + 1e-9, _STRAIGHTEN_STEP)
    cos, sin = np.cos(np.deg2rad(degrees))[:, None], np.sin(np.deg2rad(degrees))[:, None]
    along, across = x * cos + y * sin, y * cos - x * sin
    area = (np.ptp(along, axis=1) + 1) * (np.ptp(across, axis=1) + 1)
    return float(degrees[np.lexsort((np.abs(degrees), area))[0]])


def straighten(crop: np.ndarray, threshold: float = 0.1, noise: float = 0.0) -> np.ndarray:
    """Turn a trimmed garment upright (up to `STRAIGHTEN_MAX_DEGREES`), as the dataset's garments are.

    A phone is rarely held square to the garment, and a few degrees of tilt cost the classifier points
    (docs/photos.md). `crop` is `trim`'s output on a `flatten_background` image (background 0); the garment is
    found as in `trim` (`threshold`, `noise`). A tilt under half a degree is left alone and `crop` returned as it
    is, so an upright photo is not resampled; otherwise the crop, padded with black so `trim` sees background all
    round, is turned and trimmed again. The cost is that of the crop: a few thousand outline points per angle.
    """
    peak = float(crop.max())
    angle = _tilt(_garment_mask(crop, threshold * peak, noise))
    if abs(angle) < _STRAIGHTEN_MIN_DEGREES:
        return crop
    padded = np.pad(crop, 2 + max(crop.shape) // 16)
    turned = np.asarray(Image.fromarray(padded).rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=0))
    return trim(turned, threshold, noise=noise)


def trim(gray: np.ndarray, threshold: float = 0.1, margin: float = 0.0, noise: float = 0.0) -> np.ndarray:
    """Crop to the garment, because the dataset scaled each garment's own box (not the photo) to 28 pixels.

    A pixel is garment when it is above the background (border median) by `threshold` of the way to the brightest
    pixel. The dataset trimmed at 5% of the range, on studio photos; phone photos are noisier, so 10% (measured to
    recover the originals as well: see tests/test_images.py). With a `noise` level (`flatten_background`'s) it must
    also stand out from the noise (`_garment_mask`). On large images a row or column needs a few such pixels, so
    specks do not stretch the box. `margin` (a fraction of the box's long side, none in the dataset) is added on
    every side.
    """
    background = float(np.median(_border(gray)))
    peak = float(gray.max())
    if peak - background < MIN_CONTRAST:
        raise ImageError("the image looks empty: no garment stands out from the background; "
                         "photograph the garment on a plain, contrasting background")
    mask = _garment_mask(gray, background + threshold * (peak - background), noise)
    min_count = 1 + min(gray.shape) // 200
    rows = np.flatnonzero(mask.sum(axis=1) >= min_count)
    cols = np.flatnonzero(mask.sum(axis=0) >= min_count)
    if rows.size == 0 or cols.size == 0:
        raise ImageError("the image looks empty: the garment is too small or too faint; "
                         "photograph it closer on a plain, contrasting background")
    crop = gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    pad = round(margin * max(crop.shape))
    return np.pad(crop, pad, constant_values=round(background)) if pad else crop


def fit_to_canvas(gray: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Resize the longest edge to `size` keeping the aspect ratio, centred on black, as the dataset was made.

    The result is that of centring the crop on a black square of its long side and resizing the square (LANCZOS,
    box-reducing first while more than 3x too large), so the short side keeps its exact scale and position instead
    of being rounded to whole pixels (measured: clearly closer to the dataset's images). But the square is never
    built at full size: the crop is box-reduced first and padded after, so the cost grows with the crop's pixel
    count, not with its long side squared (a 1x100,000 crop would otherwise need a 10 GB square).
    """
    height, width = gray.shape
    side = max(height, width)
    factor = int(side / size / _REDUCING_GAP) or 1
    square = _reduce_onto_square(gray, side, factor)
    extent = side / factor
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS, box=(0, 0, extent, extent))
    return np.asarray(resized)


def sharpen(image: np.ndarray) -> np.ndarray:
    """Sharpen the 28x28 as the dataset's images were after their resizing (`SHARPEN`).

    Resampling a photo down leaves edges softer than the dataset's. On phone-like photos (docs/photos.md) it
    gained 0.3 points on clean photos and 1.5 on photos with every fault (training images, where it was chosen);
    on the test images' photos -0.2 and +1.05.
    """
    return np.asarray(Image.fromarray(image).filter(SHARPEN))


def _reduce_onto_square(gray: np.ndarray, side: int, factor: int) -> np.ndarray:
    """What `Image.reduce(factor)` gives for `gray` centred on a black `side` x `side` square, from the crop alone.

    Block sums come from the crop's own pixels (np.add.reduceat on the block boundaries the square would have);
    the black padding adds nothing to a sum but counts in its block's size. Rounded like Pillow's reduce().
    """
    height, width = gray.shape
    top, left = (side - height) // 2, (side - width) // 2
    cells = -(-side // factor)
    square = np.zeros((cells, cells), np.uint8)
    if factor == 1:
        square[top:top + height, left:left + width] = gray
        return square
    row_starts, first_row = _block_starts(top, height, factor)
    col_starts, first_col = _block_starts(left, width, factor)
    if len(row_starts) * width <= height * len(col_starts):  # sum along the axis that shrinks most first
        sums = np.add.reduceat(np.add.reduceat(gray, row_starts, axis=0, dtype=np.uint64), col_starts, axis=1)
    else:
        sums = np.add.reduceat(np.add.reduceat(gray, col_starts, axis=1, dtype=np.uint64), row_starts, axis=0)
    rows = np.arange(first_row, first_row + len(row_starts))
    cols = np.arange(first_col, first_col + len(col_starts))
    counts = (np.minimum(factor, side - rows * factor)[:, None]
              * np.minimum(factor, side - cols * factor)[None, :]).astype(np.uint64)
    square[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = _pillow_mean(sums, counts)
    return square


def _block_starts(offset: int, length: int, factor: int) -> tuple[np.ndarray, int]:
    """Where the square's blocks of `factor` start inside a crop placed at `offset`, and the first block's index."""
    first, last = offset // factor, (offset + length - 1) // factor
    starts = np.arange(first, last + 1) * factor - offset
    starts[0] = 0
    return starts, first


def _pillow_mean(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Block means rounded bit for bit as Pillow's reduce() does (a float32 reciprocal, then a 24-bit shift).

    Beyond Pillow's range (blocks of 65,536 pixels or more, where its reciprocal loses precision) they are rounded
    exactly.
    """
    multiplier = np.floor(np.float32(2.0**32) / (counts * 256).astype(np.float32)).astype(np.uint64)
    pillow = ((sums + counts // 2) * multiplier) >> np.uint64(24)
    exact = (sums + counts // 2) // counts
    return np.where(counts < 65536, pillow, exact).astype(np.uint8)


def match_intensity(gray: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Stretch so the brightest garment pixels reach 255 like the dataset's (92% of its images reach 255).

    The `percentile` of the garment pixels (those above a fifth of the maximum) sets the white point, so the one
    or two brightest pixels of a 28x28 garment (resampling overshoot, a speck) do not keep it dim. Not lower: the
    dataset's own 99th percentile is about 247, so a 99th-percentile white point overexposes dataset-like images
    (measured on the test set: off by 3.6 gray levels on average, against 2.4 at 99.5 and 0.03 at the maximum).
    """
    peak = int(gray.max())
    if peak == 0:
        return gray
    white = float(np.percentile(gray[gray >= 0.2 * peak], percentile))
    return _to_uint8(np.minimum(gray, white), white)


def looks_like_dataset_image(gray: np.ndarray) -> bool:
    """Whether the input is already in dataset form (28x28, dark border); such inputs pass through unchanged.

    "Dark" is judged like `border_is_light`, so the few dataset images whose garment covers much of the border
    (border medians up to 91 in the test set) still count.
    """
    return gray.shape == (SIZE, SIZE) and np.median(_border(gray, 1)) < 128 and not border_is_light(gray)


# ----------------------------------------------------------------------------------------------- pipeline
def _from_array(array: np.ndarray, label: str) -> Image.Image:
    """A numpy image (H, W) or (H, W, 1/3/4), uint8/uint16/bool/float 0..1, as a Pillow image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageError(f"{label}: expected an array of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.size == 0:
        raise ImageError(f"{label}: the image is {array.shape[1]}x{array.shape[0]} pixels; it has no pixels")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            raise ImageError(f"{label}: the array holds NaN or infinite values; pass finite pixel values")
        array = _to_uint8(array, 1.0 if array.min() >= 0 and array.max() <= 1 else 255.0)
    elif array.dtype == np.uint16:
        array = _to_uint8(array, 65535.0)
    elif np.issubdtype(array.dtype, np.integer):
        array = np.clip(array, 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"{label}: unsupported array dtype {array.dtype}; use uint8 (0..255) or float (0..1)")
    return Image.fromarray(np.ascontiguousarray(array))


def prepare(source: Source, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
            upright: bool = False) -> Prepared:
    """Turn a photo (path, bytes, file object, numpy array or Pillow image) into the model's 28x28 input.

    Inputs already in dataset form (28x28 on a dark border) pass through unchanged, so dataset images and
    their exports predict exactly as in evaluation. The photo is made gray and shrunk to `WORK_SIDE` before the
    other steps, and the full-size decoded photo is let go, so the cost after decoding is that of a small image.
    With `upright`, a tilted garment is also turned upright (`straighten`): measured on photos of training images,
    +1.5 points on photos with every fault (tilts up to 8 degrees) but -0.4 on clean upright ones (docs/photos.md),
    so it is asked for.
    """
    label = _label(source, name)
    original = _original(source, label, max_pixels)
    try:
        gray = to_grayscale(original)
        original = _for_display(original)
        gray = shrink(gray)
        if looks_like_dataset_image(gray):
            return Prepared(gray, original, {"gray": gray, "final": gray}, False, True, label)
        inverted, was_inverted, noise = flatten_background(gray)
        trimmed = trim(inverted, noise=noise)
        if upright:
            trimmed = straighten(trimmed, noise=noise)
        resized = fit_to_canvas(trimmed)
        sharpened = sharpen(resized)
        final = match_intensity(sharpened)
    except ImageError as error:
        raise ImageError(f"{label}: {error}") from None
    except MemoryError:
        raise ImageError(f"{label}: not enough memory to prepare the image; resize it before uploading") from None
    steps = {"gray": gray, "inverted": inverted, "trimmed": trimmed, "resized": resized, "sharpened": sharpened,
             "final": final}
    return Prepared(final, original, steps, was_inverted, False, label)


def _original(source: Source, label: str, max_pixels: int) -> Image.Image:
    """The source as a decoded Pillow image: arrays converted, images checked and loaded, anything else read."""
    if isinstance(source, np.ndarray):
        return _from_array(source, label)
    if not isinstance(source, Image.Image):
        return load_image(source, name=label, max_pixels=max_pixels, draft_side=WORK_SIDE)
    if source.width == 0 or source.height == 0:
        raise ImageError(f"{label}: the image is {source.width}x{source.height} pixels; it has no pixels")
    if source.width * source.height > max_pixels:
        raise _too_large(label, source.width, source.height, max_pixels)
    try:
        source.load()
    except _BROKEN as error:
        raise ImageError(f"{label}: the image cannot be decoded ({error}); it is truncated or corrupt") from None
    return source
