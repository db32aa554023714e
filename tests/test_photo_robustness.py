"""fmnist.images on phone-like photos: tinted, unevenly lit, noisy, tilted; small generated images, no dataset.

Accuracy on real photos of dataset images belongs to benchmarks/photos.py (docs/photos.md), not to this fast suite:
these tests pin the behaviours that accuracy rests on.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fmnist import images

WIDTH, HEIGHT = 400, 300
TINT = np.array([1.08, 0.97, 0.86])  # warm light on a gray table


def garment_coverage(angle: float = 0.0) -> np.ndarray:
    """A T-shirt-like shape (body and sleeves, 0..1), turned by `angle` degrees about the photo's centre."""
    shape = Image.new("L", (WIDTH, HEIGHT), 0)
    draw = ImageDraw.Draw(shape)
    draw.rectangle((150, 80, 249, 229), fill=255)  # body
    draw.polygon([(150, 80), (110, 120), (130, 140), (150, 115)], fill=255)  # left sleeve
    draw.polygon([(249, 80), (289, 120), (269, 140), (249, 115)], fill=255)  # right sleeve
    if angle:
        shape = shape.rotate(angle, Image.Resampling.BICUBIC, center=(WIDTH / 2, HEIGHT / 2))
    return np.asarray(shape, np.float64) / 255


def lighting(strength: float = 0.3) -> np.ndarray:
    """Light falling off from left to right by `strength`, and a vignette darkening the corners by 15%."""
    rows = np.linspace(-1, 1, HEIGHT)[:, None]
    cols = np.linspace(-1, 1, WIDTH)[None, :]
    return (1 - strength * (cols + 1) / 2) * (1 - 0.15 * (rows**2 + cols**2) / 2)


def photo(coverage: np.ndarray, *, light: np.ndarray | float = 1.0, tint: np.ndarray = TINT, noise: float = 0.0,
          jpeg: int | None = None, seed: int = 0) -> bytes:
    """A dark garment on a light (tinted, lit) background, as RGB PNG, or JPEG at quality `jpeg`."""
    luminance = 225.0 * light * (1 - 0.9 * coverage)
    rgb = luminance[..., None] * tint
    if noise:
        rgb = rgb + np.random.default_rng(seed).normal(0, noise, rgb.shape)
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if jpeg else "PNG", **({"quality": jpeg} if jpeg else {}))
    return buffer.getvalue()


def margins(image: np.ndarray, rows: int = 2) -> np.ndarray:
    """The top and bottom `rows` of a 28x28 result: background, since this garment is wider than tall (its width
    spans the 28 pixels; LANCZOS rings a few levels there, as in `fit_to_canvas`'s own tests)."""
    return np.concatenate([image[:rows], image[-rows:]]).ravel()


def outside(image: np.ndarray) -> np.ndarray:
    """The pixels where the clean reference photo's result is black: background, away from the garment's edge."""
    return image[reference() == 0]


def box(image: np.ndarray, level: int = 64) -> tuple[int, int]:
    """(height, width) of the pixels brighter than `level`."""
    rows = np.flatnonzero((image > level).any(axis=1))
    cols = np.flatnonzero((image > level).any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def reference() -> np.ndarray:
    """The shape on a plain, evenly lit, gray, noiseless background: what every harder photo should come back as."""
    return images.prepare(photo(garment_coverage(), tint=np.ones(3))).image


# ----------------------------------------------------------------------------------------------- background
def test_tinted_unevenly_lit_background_comes_out_black_and_garment_bright():
    prepared = images.prepare(photo(garment_coverage(), light=lighting()))
    assert prepared.inverted
    assert margins(prepared.image).max() <= 8, margins(prepared.image)
    assert outside(prepared.image).mean() <= 1.0
    assert prepared.image.max() == 255 and prepared.image[14, 14] >= 200  # the body, across its darker side too
    assert np.abs(prepared.image.astype(int) - reference()).mean() <= 2.0


def test_gradient_does_not_leave_a_haze_that_widens_the_box():
    """With one level subtracted, the dark side of a 30% gradient stayed gray and trim took it for garment."""
    prepared = images.prepare(photo(garment_coverage(), light=lighting(0.3)))
    assert box(prepared.image) == box(reference())


def test_background_surface_follows_a_gradient_and_measures_the_noise():
    light = 200.0 * lighting(0.4)
    gray = np.clip(np.rint(light + np.random.default_rng(1).normal(0, 3, light.shape)), 0, 255).astype(np.uint8)
    surface, noise = images.background_surface(gray)
    assert surface.shape == gray.shape and surface.dtype == np.float32
    assert np.abs(surface - light).max() <= 2.5  # the centre too, which the border never sees
    assert noise == pytest.approx(3.0, abs=0.5)


def test_a_garment_touching_the_border_does_not_tilt_the_surface():
    gray = np.full((200, 300), 220, np.uint8)
    gray[40:, 100:180] = 30  # a dress running off the bottom edge
    surface, _ = images.background_surface(gray)
    assert np.abs(surface - 220).max() <= 1.0


def test_light_garment_on_an_unevenly_lit_dark_background_is_not_inverted():
    light = 60.0 * lighting(0.5)
    gray = light + 150.0 * garment_coverage()
    prepared = images.prepare(np.clip(np.rint(gray), 0, 255).astype(np.uint8))
    assert not prepared.inverted
    assert margins(prepared.image).max() <= 8 and prepared.image.max() == 255
    assert outside(prepared.image).mean() <= 1.0


# ----------------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize("jpeg", [None, 70])
def test_noise_leaves_no_speckle_outside_the_garment(jpeg):
    prepared = images.prepare(photo(garment_coverage(), light=lighting(), noise=8.0, jpeg=jpeg))
    assert margins(prepared.image).max() <= 12, margins(prepared.image)
    assert outside(prepared.image).mean() <= 2.0
    assert np.percentile(outside(prepared.image), 99) <= 16  # no bright speck
    assert np.abs(np.array(box(prepared.image)) - box(reference())).max() <= 1


def test_noise_alone_is_refused_as_empty():
    noise = np.random.default_rng(2).normal(200, 6, (HEIGHT, WIDTH))
    with pytest.raises(images.ImageError, match="looks empty"):
        images.prepare(np.clip(np.rint(noise), 0, 255).astype(np.uint8))


def test_trim_with_noise_ignores_noise_that_the_plain_threshold_keeps():
    rng = np.random.default_rng(3)
    gray = np.clip(np.rint(rng.normal(0, 12, (300, 400))), 0, 255).astype(np.uint8)  # noise of 12 levels
    gray[100:200, 150:250] = 220
    assert images.trim(gray).shape == (300, 400)  # the noise passes 10% of the range: the box is the photo
    height, width = images.trim(gray, noise=12.0).shape
    assert 100 <= height <= 102 and 100 <= width <= 102  # the 3x3 mean moves each edge by at most a pixel


# ----------------------------------------------------------------------------------------------- tilt
@pytest.mark.parametrize("angle", [-7.0, 4.0])
def test_a_tilted_garment_is_turned_upright_when_asked(angle):
    """Mean difference to the upright result: 3.0 and 6.2 gray levels; 24.6 and 16.2 when left tilted."""
    tilted = images.prepare(photo(garment_coverage(angle), light=lighting()), upright=True).image
    assert np.abs(np.array(box(tilted)) - box(reference())).max() <= 1
    assert np.abs(tilted.astype(int) - reference()).mean() <= 8.0


def test_a_tilted_garment_is_left_tilted_by_default():
    """Straightening costs upright photos a little (docs/photos.md), so `prepare` only does it when asked."""
    tilted = images.prepare(photo(garment_coverage(-7.0), light=lighting())).image
    assert np.abs(tilted.astype(int) - reference()).mean() >= 15.0


def test_straighten_leaves_an_upright_garment_untouched():
    crop = images.trim(images.flatten_background(np.asarray(Image.open(io.BytesIO(photo(garment_coverage())))
                                                            .convert("L")))[0])
    assert images.straighten(crop) is crop


# ----------------------------------------------------------------------------------------------- as before
def test_clean_photo_prepares_as_the_plain_recipe_did():
    """No tint, light or noise: the same image as negating and subtracting one background level (the recipe before
    surfaces, written out here), within rounding, up to the resize, so the background surface changes nothing on a
    clean photo. Compared at the same intensity scale: dividing by the background leaves the garment brighter than
    subtracting does, and the sharpening after the resize clips at 255, so the final images differ by that."""
    clean = photo(garment_coverage(), tint=np.ones(3))
    gray = images.to_grayscale(Image.open(io.BytesIO(clean)))
    level = np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]]))
    negated = np.clip(level - gray.astype(int), 0, 255).astype(np.uint8)
    plain = images.match_intensity(images.fit_to_canvas(images.trim(negated)))
    prepared = images.prepare(clean)
    assert np.abs(images.match_intensity(prepared.steps["resized"]).astype(int) - plain).max() <= 3
    assert np.array_equal(prepared.image, images.match_intensity(images.sharpen(prepared.steps["resized"])))


def test_dataset_style_image_still_passes_through_unchanged():
    image = np.zeros((28, 28), np.uint8)
    image[3:25, 8:20] = np.linspace(90, 255, 12).astype(np.uint8)
    prepared = images.prepare(image)
    assert prepared.passthrough
    np.testing.assert_array_equal(prepared.image, image)
