"""`fmnist predict RUN FILES...`: photos in, top-k out; folders walked; one bad file reported, the rest predicted."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw
from test_train import learnable_arrays, small

from fmnist import images, training
from fmnist.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos-run") / "run"
    training.train(small("classic-sgd", epochs=2, validation=40), arrays=learnable_arrays(), out_dir=folder)
    return folder


@pytest.fixture
def photos(tmp_path):
    """A folder of 'phone photos' (dark garment-like band on a light canvas, JPEG/PNG) plus one broken file."""
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for index, (name, size) in enumerate((("a.jpg", (300, 400)), ("nested/b.png", (500, 200)))):
        canvas = np.full(size[::-1], 230, np.uint8)
        canvas[size[1] // 4: size[1] // 2, size[0] // 5: 4 * size[0] // 5] = 20 + index
        Image.fromarray(canvas).convert("RGB").save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    (folder / "notes.txt").write_text("not walked: not an image suffix")
    return folder


def test_folder_is_walked_bad_file_reported_rest_predicted(run, photos, capsys):
    code = main(["predict", str(run), str(photos), "--json", "--top", "2"])
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert code == 2
    assert [r["file"].split("photos/")[1] for r in rows] == ["a.jpg", "broken.png", "nested/b.png"]
    good = [r for r in rows if "error" not in r]
    assert len(good) == 2 and all(len(r["top"]) == 2 and r["inverted"] for r in good)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in good)
    assert "broken.png" in captured.err and "Traceback" not in captured.err


def test_csv_and_show_outputs(run, photos, tmp_path, capsys):
    image = photos / "a.jpg"
    out_csv, out_png = tmp_path / "p.csv", tmp_path / "shown.png"
    assert main(["predict", str(run), str(image), "--csv", str(out_csv), "--show", str(out_png)]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 1 and rows[0]["file"] == str(image) and rows[0]["predicted"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_plain_output_names_the_class_and_a_missing_file_is_exit_2(run, photos, tmp_path, capsys):
    assert main(["predict", str(run), str(photos / "a.jpg")]) == 0
    assert "a.jpg:" in capsys.readouterr().out
    assert main(["predict", str(run), str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg" in capsys.readouterr().err


def tilted_garment(path, angle: float = 6.0):
    """A dark upright-box garment turned by `angle` degrees on a light canvas, as PNG: what `--upright` is for."""
    shape = Image.new("L", (300, 240), 0)
    ImageDraw.Draw(shape).rectangle((110, 50, 189, 189), fill=255)
    shape = np.asarray(shape.rotate(angle, Image.Resampling.BICUBIC, center=(150, 120)), np.float64) / 255
    Image.fromarray(np.rint(230 - 200 * shape).astype(np.uint8)).save(path)
    return path


def test_upright_flag_reaches_prepare_and_straightens_the_garment(run, tmp_path, monkeypatch, capsys):
    """Off by default (it costs upright photos a little); with --upright the tilted box comes out upright."""
    photo = tilted_garment(tmp_path / "tilted.png")
    calls, original = [], images.prepare

    def spy(source, **kwargs):
        prepared = original(source, **kwargs)
        calls.append((kwargs.get("upright", False), prepared.image))
        return prepared

    monkeypatch.setattr(images, "prepare", spy)
    assert main(["predict", str(run), str(photo), "--json"]) == 0
    assert main(["predict", str(run), str(photo), "--json", "--upright"]) == 0
    capsys.readouterr()
    (plain_flag, plain), (upright_flag, upright) = calls
    assert plain_flag is False and upright_flag is True
    np.testing.assert_array_equal(upright, original(photo, upright=True).image)
    assert np.abs(upright.astype(int) - plain).mean() > 5  # 19 gray levels apart: the tilt is gone
