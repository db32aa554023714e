"""Accuracy on phone-like photos made from dataset images, through `fmnist.images.prepare`, against the originals.

Each 28x28 image becomes a photo the way a product shot on a phone would look (seeded, every parameter drawn per
photo): upscaled to 200-600 px (bicubic), negated into a dark garment on a light background (the garment darkens
the background multiplicatively, so there is no edge around the original 28x28 frame), and then, one factor each:

    tint       a coloured background: per-channel gains of up to +-12% around a gray of 170-240
    lighting   uneven light over the whole photo: a linear gradient (up to 30% end to end) times a vignette
               (up to 25% darker in the corners); the garment is lit by it too
    rotation   the garment turned by up to +-8 degrees
    offset     placed off-centre: margins of 5-45% of the garment's side on each side (otherwise 20% all round)
    blur       a Gaussian blur of 0.4-1.8% of the garment's side (2-4 px on a 300 px garment)
    noise      sensor noise: Gaussian, 3-10 gray levels per channel, plus a little (1/3 as much) shared by the
               channels
    jpeg       JPEG at quality 60-90 with 4:2:0 chroma (otherwise PNG, lossless)

"clean" is none of them (a centred, upright, sharp, gray photo saved as PNG); "all" is all of them; with
`--per-factor` each factor is also measured alone, on the same photos (the same draws, the others switched off).

No tuning on the answers: the preprocessing was developed on photos of TRAINING images (`--split train`, seed 1,
a seeded sample of 2,000) and the final figure is reported on photos of the first 2,000 TEST images (`--split
test`, seed 2). `--upright` measures `prepare(..., upright=True)`; `--images-module` another copy of
src/fmnist/images.py (the code before a change). About 10 minutes each on 2 shared cores:

    .venv/bin/python benchmarks/photos.py --run /tmp/photo-model --split train --seed 1 --per-factor
    .venv/bin/python benchmarks/photos.py --run /tmp/photo-model --split test --seed 2 --per-factor [--upright]

Prints a table (accuracy on the 28x28 originals, through `prepare` on the photos, the ratio, time per photo) and
writes benchmarks/results/photos-<YYYY-MM-DDTHHMMSS>.json with the CPU, versions, commit, model run and seeds.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from _machine import cpu_name, git_commit
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FACTORS = ("tint", "lighting", "rotation", "offset", "blur", "noise", "jpeg")


@dataclass(frozen=True)
class PhotoParams:
    """Every random choice for one photo, drawn whatever factors are on, so conditions compare the same photos."""

    side: int
    gray: float
    tint: tuple[float, float, float]
    gradient: tuple[float, float]
    vignette: float
    angle: float
    margins: tuple[float, float, float, float]  # left, top, right, bottom, as fractions of the garment's side
    blur: float  # Gaussian radius as a fraction of the garment's side
    noise: float
    quality: int


def draw_params(rng: np.random.Generator) -> PhotoParams:
    """One photo's parameters (the ranges are those of the module docstring)."""
    direction = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0.0, 0.3)
    return PhotoParams(
        side=int(rng.integers(200, 601)), gray=float(rng.uniform(170, 240)),
        tint=tuple(float(value) for value in rng.uniform(0.88, 1.12, 3)),
        gradient=(float(strength * np.cos(direction)), float(strength * np.sin(direction))),
        vignette=float(rng.uniform(0.0, 0.25)), angle=float(rng.uniform(-8, 8)),
        margins=tuple(float(value) for value in rng.uniform(0.05, 0.45, 4)),
        blur=float(rng.uniform(0.004, 0.018)), noise=float(rng.uniform(3, 10)), quality=int(rng.integers(60, 91)))


def garment_layer(image: np.ndarray, params: PhotoParams, factors: frozenset[str]) -> np.ndarray:
    """The garment's coverage (0..1, float) at photo size: upscaled, rotated, blurred."""
    big = Image.fromarray(image).resize((params.side, params.side), Image.Resampling.BICUBIC)
    if "rotation" in factors:
        big = big.rotate(params.angle, Image.Resampling.BICUBIC, expand=True, fillcolor=0)
    if "blur" in factors:
        big = big.filter(ImageFilter.GaussianBlur(params.blur * params.side))
    return np.asarray(big, np.float64) / 255


def lighting_field(height: int, width: int, params: PhotoParams) -> np.ndarray:
    """A smooth multiplicative light level around 1: a linear gradient times a vignette."""
    rows = np.linspace(-1, 1, height)[:, None]
    cols = np.linspace(-1, 1, width)[None, :]
    gradient = 1 + 0.5 * (params.gradient[0] * cols + params.gradient[1] * rows)
    vignette = 1 - params.vignette * (rows**2 + cols**2) / 2
    return gradient * vignette


def make_photo(image: np.ndarray, params: PhotoParams, factors: frozenset[str], rng: np.random.Generator) -> bytes:
    """A phone-like photo of one dataset image (dark garment on a light background), encoded as PNG or JPEG."""
    garment = garment_layer(image, params, factors)
    size = garment.shape[0]
    margins = params.margins if "offset" in factors else (0.2,) * 4
    left, top, right, bottom = (round(margin * params.side) for margin in margins)
    height, width = size + top + bottom, size + left + right
    coverage = np.zeros((height, width))
    coverage[top:top + size, left:left + size] = garment
    light = lighting_field(height, width, params) if "lighting" in factors else 1.0
    luminance = params.gray * light * (1 - coverage)
    gains = np.array(params.tint) if "tint" in factors else np.ones(3)
    rgb = luminance[..., None] * gains
    if "noise" in factors:
        rgb = rgb + rng.normal(0, params.noise, rgb.shape) + rng.normal(0, params.noise / 3, (height, width, 1))
    photo = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    if "jpeg" in factors:
        photo.save(buffer, format="JPEG", quality=params.quality, subsampling="4:2:0")
    else:
        photo.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def conditions(per_factor: bool) -> dict[str, frozenset[str]]:
    """The factor sets measured: clean, each factor alone (with --per-factor), and all of them."""
    chosen = {"clean": frozenset()}
    if per_factor:
        chosen.update({factor: frozenset({factor}) for factor in FACTORS})
    chosen["all"] = frozenset(FACTORS)
    return chosen


def images_module(path: Path | None) -> ModuleType:
    """`fmnist.images`, or another copy of it loaded from `path` (to measure the code before a change)."""
    if path is None:
        from fmnist import images

        return images
    spec = importlib.util.spec_from_file_location("fmnist_images_compared", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def prepared_images(originals: np.ndarray, seed: int, factors: frozenset[str],
                    prepare: Callable[[bytes], Any]) -> tuple[np.ndarray, float, int]:
    """Every original as a photo through `prepare`: the 28x28 results, seconds per photo in `prepare`, failures.

    Photo i's parameters and noise come from the generator seeded with (seed, i), so every condition sees the same
    draws and a photo does not depend on how many came before it. A photo `prepare` refuses counts as wrong (a
    blank image is classified in its place).
    """
    from fmnist.errors import ImageError

    out = np.zeros((len(originals), 28, 28), np.uint8)
    seconds, failures = 0.0, 0
    for index, image in enumerate(originals):
        rng = np.random.default_rng([seed, index])
        photo = make_photo(image, draw_params(rng), factors, rng)
        started = time.perf_counter()
        try:
            out[index] = prepare(photo).image
        except ImageError:
            failures += 1
        seconds += time.perf_counter() - started
    return out, seconds / max(1, len(originals)), failures


def choose_images(split: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """`count` images of a split: the first ones of the test split, a seeded sample of the training split."""
    from fmnist.data import load_data

    (x_train, y_train), (x_test, y_test) = load_data()
    images, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
    count = min(count, len(images))
    if split == "train":
        indices = np.sort(np.random.default_rng(seed).choice(len(images), count, replace=False))
    else:
        indices = np.arange(count)
    return images[indices], labels[indices], indices.tolist()


def context(args: argparse.Namespace, run_meta: dict[str, Any]) -> dict[str, Any]:
    """The machine, versions, commit and model run every number needs."""
    import PIL
    import torch

    from fmnist.devices import cpu_class

    os.environ.setdefault("GIT_OPTIONAL_LOCKS", "0")  # `git status` must not take the index lock of a busy checkout
    return {"cpu": cpu_name(), "cpu_class": cpu_class(), "precision": "fp32 (inference)", "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "run": str(args.run), "model": run_meta, "split": args.split, "count": args.count, "seed": args.seed,
            "images_module": str(args.images_module or "fmnist.images"), "upright": args.upright,
            "load_average_at_start": os.getloadavg()}


def run_meta(run: Path) -> dict[str, Any]:
    """The parts of the run's model.json that identify the model (preset, architecture, its test accuracy)."""
    try:
        meta = json.loads((run / "model.json").read_text())
    except (OSError, ValueError):
        return {}
    keep = ("preset", "architecture", "model", "name", "seed", "test_accuracy", "metrics", "created")
    return {key: meta[key] for key in keep if key in meta}


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per condition."""
    print(f"{'condition':<10} {'n':>6} {'originals':>10} {'photos':>8} {'ratio':>7} {'ms/photo':>9} {'refused':>8}")
    for row in rows:
        print(f"{row['condition']:<10} {row['n']:>6} {row['originals']:>10.4f} {row['photos']:>8.4f} "
              f"{row['ratio']:>7.4f} {row['ms_per_photo']:>9.2f} {row['refused']:>8}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run folder written by `fmnist train`")
    parser.add_argument("--split", choices=["train", "test"], default="train",
                        help="which images the photos are made from (develop on train, report on test)")
    parser.add_argument("--count", type=int, default=2000, help="how many images")
    parser.add_argument("--seed", type=int, default=1, help="seed of the sample and of every photo's parameters")
    parser.add_argument("--per-factor", action="store_true", help="also measure each factor alone")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results JSON")
    parser.add_argument("--upright", action="store_true",
                        help="call prepare(..., upright=True): also turn tilted garments upright")
    parser.add_argument("--images-module", type=Path, default=None,
                        help="measure another copy of src/fmnist/images.py (e.g. the code before a change); "
                             "default: the installed fmnist.images")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Make the photos, prepare and classify them, print the table and write the results file."""
    args = parse(argv)
    from fmnist.predict import Classifier

    classifier = Classifier.load(args.run)
    prepare = images_module(args.images_module).prepare
    if args.upright:
        prepare = functools.partial(prepare, upright=True)
    originals, labels, indices = choose_images(args.split, args.count, args.seed)
    on_originals = float((classifier.predict(originals) == labels).mean())
    rows = []
    for name, factors in conditions(args.per_factor).items():
        prepared, seconds, refused = prepared_images(originals, args.seed, factors, prepare)
        on_photos = float((classifier.predict(prepared) == labels).mean())
        rows.append({"condition": name, "factors": sorted(factors), "n": len(labels), "originals": on_originals,
                     "photos": on_photos, "ratio": on_photos / on_originals, "ms_per_photo": 1000 * seconds,
                     "refused": refused})
        print(f"{name}: {on_photos:.4f} ({1000 * seconds:.1f} ms/photo)", file=sys.stderr, flush=True)
    print_table(rows)
    record = {"context": context(args, run_meta(args.run)), "factors": list(FACTORS),
              "example_params": asdict(draw_params(np.random.default_rng([args.seed, 0]))), "rows": rows,
              "indices_first": indices[:20]}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"photos-{datetime.now().strftime('%Y-%m-%dT%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
