"""Turning an arbitrary photo into a Fashion-MNIST-like 28x28 input.

The dataset was made from product photos: trimmed, longest edge resized to 28, padded and centred, negated (light
garment on black), 8-bit gray. A user's photo is the opposite (a dark garment on a light background, off-centre, in
colour, maybe rotated by EXIF), so `prepare()` repeats the dataset's recipe step by step:

    load -> gray -> invert (light garment) and darken the background -> trim -> fit to 28x28 -> match intensity

Every step is a small public function so a page or a notebook can show the intermediate images. Every problem
with an image raises `ImageError` with one line that names the file, the problem and the fix.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fmnist.errors import ImageError

SIZE = 28
DEFAULT_MAX_PIXELS = 40_000_000
# A garment must stand out from the background by at least this many gray levels: JPEG noise on a plain
# background is a few levels, so anything weaker is treated as an empty photo rather than stretched into noise.
MIN_CONTRAST = 24
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"

Source = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | np.ndarray | Image.Image


@dataclass(frozen=True)
class Prepared:
    """The model input plus what led to it: the loaded photo and each intermediate image, for display.

    `steps` holds "gray", "inverted" (already with a black background), "trimmed", "resized" and "final"; an input
    that passed through unchanged (already in dataset form) has only "gray" and "final".
    """

    image: np.ndarray = field(repr=False)  # (28, 28) uint8, light garment on black
    original: Image.Image = field(repr=False)
    steps: dict[str, np.ndarray] = field(repr=False)
    inverted: bool
    passthrough: bool
    name: str


# ----------------------------------------------------------------------------------------------- loading
def load_image(source: str | os.PathLike | bytes | BinaryIO, *, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read a path, bytes or file object fully into a Pillow image, upright as the camera meant it (EXIF).

    The whole image is decoded here, so a truncated upload fails now with a clear message instead of later with a
    half-gray picture; the pixel limit is checked from the header, before any pixels are decoded.
    """
    label = _label(source, name)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{label}: no such file; check the path")
        if not path.is_file():
            raise ImageError(f"{label}: not a regular file; pass an image file")
        payload = path.read_bytes()
    elif isinstance(source, (bytes, bytearray, memoryview)):
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
    try:
        with Image.open(io.BytesIO(payload)) as opened:
            width, height = opened.size
            if width == 0 or height == 0:
                raise ImageError(f"{label}: the image is {width}x{height} pixels; it has no pixels to read")
            if width * height > max_pixels:
                raise _too_large(label, width, height, max_pixels)
            opened.load()
            image = _upright(opened)
    except Image.DecompressionBombError as error:
        raise ImageError(f"{label}: the image is too large to decode safely, over the limit of {max_pixels:,} "
                         f"pixels ({error}); resize it before uploading") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image (or a format Pillow cannot read); use {_FORMATS}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise ImageError(f"{label}: the image cannot be decoded ({detail}); the file is truncated or corrupt, "
                         "save or download it again") from None
    return image


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


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phones store photos sideways and set a tag); a broken tag is ignored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block must not cost the prediction: use the pixels as stored
        return image.copy()


# ----------------------------------------------------------------------------------------------- steps
def _border(gray: np.ndarray, width: int | None = None) -> np.ndarray:
    """The pixels of a frame a few pixels wide (about 3% of the short side) around the image."""
    height, width_px = gray.shape
    width = width or max(1, min(height, width_px) // 32)
    if 2 * width >= min(height, width_px):
        return gray.ravel()
    return np.concatenate([gray[:width].ravel(), gray[-width:].ravel(),
                           gray[width:-width, :width].ravel(), gray[width:-width, -width:].ravel()])


def _to_uint8(values: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Scale numbers whose white is `full_scale` to 0..255; without a known scale, stretch min..max."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if full_scale is None:
        low, high = float(values.min()), float(values.max())
        values, full_scale = values - low, (high - low) or 1.0
    return np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)


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


def to_grayscale(image: Image.Image) -> np.ndarray:
    """Any Pillow image as (H, W) uint8 gray, because the dataset is 8-bit gray.

    16-bit images are scaled (65535 -> 255) rather than clipped; float images in 0..1 are scaled by 255;
    transparency is composited onto a background chosen by `_transparent_background`.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT:
        return _to_uint8(np.asarray(image), 65535.0)
    if mode in ("I", "F"):
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        low, high = float(values.min()), float(values.max())
        if mode == "F" and low >= 0 and high <= 1:
            return _to_uint8(values, 1.0)
        if low >= 0 and high <= 255:
            return _to_uint8(values, 255.0)
        return _to_uint8(values, 65535.0 if low >= 0 and high <= 65535 else None)
    try:
        if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
            rgba = image.convert("RGBA")
            gray = np.asarray(rgba.convert("L"), dtype=np.float64)
            alpha = np.asarray(rgba.getchannel("A"))
            if alpha.min() == 255:
                return gray.astype(np.uint8)
            opacity = alpha / 255.0
            composited = gray * opacity + _transparent_background(gray, alpha) * (1 - opacity)
            return _to_uint8(composited, 255.0)
        if mode in ("L", "1", "P"):
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


def invert_if_light_background(gray: np.ndarray) -> tuple[np.ndarray, bool]:
    """Negate a dark-on-light photo so the garment is light on a dark background, as in the dataset."""
    if border_is_light(gray):
        return 255 - gray, True
    return gray, False


def darken_background(gray: np.ndarray) -> np.ndarray:
    """Subtract the background level (the border median) so the background is black (0) like the dataset's."""
    level = int(np.median(_border(gray)))
    return np.clip(gray.astype(np.int16) - level, 0, 255).astype(np.uint8)


def trim(gray: np.ndarray, threshold: float = 0.1, margin: float = 0.0) -> np.ndarray:
    """Crop to the garment, because the dataset scaled each garment's own box (not the photo) to 28 pixels.

    A pixel is garment when it is above the background (border median) by `threshold` of the way to the brightest
    pixel. The dataset trimmed at 5% of the range, on studio photos; phone photos are noisier, so 10% (measured to
    recover the originals as well: see tests/test_images.py). On large images a row or column needs a few such
    pixels, so specks do not stretch the box. `margin` (a fraction of the box's long side, none in the dataset)
    is added on every side.
    """
    background = float(np.median(_border(gray)))
    peak = float(gray.max())
    if peak - background < MIN_CONTRAST:
        raise ImageError("the image looks empty: no garment stands out from the background; "
                         "photograph the garment on a plain, contrasting background")
    mask = gray > background + threshold * (peak - background)
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

    The crop is first centred on a black square and the square resized, so the short side keeps its exact scale
    and position instead of being rounded to whole pixels (measured: clearly closer to the dataset's images).
    LANCZOS keeps edges crisp; `reducing_gap` box-downscales very large crops first, which is much faster.
    """
    height, width = gray.shape
    side = max(height, width)
    square = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = gray
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized)


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


def prepare(source: Source, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
    """Turn a photo (path, bytes, file object, numpy array or Pillow image) into the model's 28x28 input.

    Inputs already in dataset form (28x28 on a dark border) pass through unchanged, so dataset images and
    their exports predict exactly as in evaluation.
    """
    label = _label(source, name)
    if isinstance(source, np.ndarray):
        original = _from_array(source, label)
    elif isinstance(source, Image.Image):
        if source.width == 0 or source.height == 0:
            raise ImageError(f"{label}: the image is {source.width}x{source.height} pixels; it has no pixels")
        if source.width * source.height > max_pixels:
            raise _too_large(label, source.width, source.height, max_pixels)
        try:
            source.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageError(f"{label}: the image cannot be decoded ({error}); it is truncated or corrupt") from None
        original = source
    else:
        original = load_image(source, name=name, max_pixels=max_pixels)
    try:
        gray = to_grayscale(original)
        if looks_like_dataset_image(gray):
            return Prepared(gray, original, {"gray": gray, "final": gray}, False, True, label)
        inverted, was_inverted = invert_if_light_background(gray)
        inverted = darken_background(inverted)
        trimmed = trim(inverted)
        resized = fit_to_canvas(trimmed)
        final = match_intensity(resized)
    except ImageError as error:
        raise ImageError(f"{label}: {error}") from None
    steps = {"gray": gray, "inverted": inverted, "trimmed": trimmed, "resized": resized, "final": final}
    return Prepared(final, original, steps, was_inverted, False, label)
