"""The HTTP API through FastAPI's test client: every endpoint, every bad input's status, batching, concurrency.

The model is a real ConvNet trained for a moment on the real dataset, so uploads of real test images go through
the same preprocessing and model as `fmnist predict`, and the answers can be compared number for number.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydantic import ValidationError

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'fmnist[serve]'")
from conftest import assert_error
from fastapi.testclient import TestClient  # noqa: E402

from fmnist import data, images, serve  # noqa: E402
from fmnist.cli import main  # noqa: E402
from fmnist.errors import ConfigError  # noqa: E402
from fmnist.predict import Classifier  # noqa: E402
from fmnist.serve import WEB_DIR, Batcher, PredictJson, ServeSettings, create_app, latest_run  # noqa: E402


@pytest.fixture(scope="module")
def test_images(real_data_source):
    (_, _), (x_test, y_test) = data.load_data(real_data_source.path)
    return x_test[:64], y_test[:64]


@pytest.fixture(scope="module")
def run(real_mlp_run):
    return real_mlp_run


@pytest.fixture(scope="module")
def classifier(run):
    return Classifier.load(run)


@pytest.fixture
def client(classifier):
    settings = ServeSettings(max_bytes=200_000, max_pixels=1_000_000, max_images=8)
    with TestClient(create_app(classifier, settings), base_url="http://localhost") as c:  # a Host the server accepts
        yield c


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format="PNG")
    return buffer.getvalue()


def phone_photo(image: np.ndarray) -> bytes:
    """A dataset image as a phone would see it: inverted, enlarged, off-centre on a light canvas, JPEG."""
    big = Image.fromarray(255 - image).resize((224, 224), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (400, 300), 255)
    canvas.paste(big, (40, 50))
    buffer = io.BytesIO()
    canvas.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def tilted_garment(angle: float = 6.0) -> bytes:
    """A dark upright-box garment turned by `angle` degrees on a light canvas, as PNG: what `upright` is for."""
    shape = Image.new("L", (300, 240), 0)
    ImageDraw.Draw(shape).rectangle((110, 50, 189, 189), fill=255)
    shape = np.asarray(shape.rotate(angle, Image.Resampling.BICUBIC, center=(150, 120)), np.float64) / 255
    return png(np.rint(230 - 200 * shape).astype(np.uint8))


# ----------------------------------------------------------------------------------------------- endpoints
def test_healthz_and_model(client, classifier):
    assert client.get("/healthz").json()["status"] == "ok"
    model = client.get("/v1/model").json()
    assert model["classes"] == list(data.CLASS_NAMES)
    assert model["preset"] == "classic-adam" and model["architecture"]["name"] == "mlp"
    assert model["test_accuracy"] == pytest.approx(classifier.meta.metrics["test_accuracy"])
    assert model["created"] and model["name"] == "mlp 128" and model["calibrated"] is True


def test_page_and_assets_are_served_without_external_urls(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<canvas id="pad"' in page.text and 'id="bars"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    for path in WEB_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), path
        assert "@import" not in text and "https://" not in text, path


def test_openapi_documents_both_request_bodies(client):
    """The JSON body's schema is the request model's, so the docs cannot drift from what the server accepts."""
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    schema = body["application/json"]["schema"]
    assert schema == PredictJson.model_json_schema()
    assert set(schema["properties"]) == {"image", "images", "scale"}
    assert schema["properties"]["scale"]["enum"] == [255, 1]
    assert schema["properties"]["image"]["maxItems"] == 28 and schema["properties"]["image"]["type"] == "array"
    assert body["multipart/form-data"]["schema"]["properties"]["file"]["items"]["format"] == "binary"
    query = {p["name"]: p for p in spec["paths"]["/v1/predict"]["post"]["parameters"]}
    assert set(query) == {"top", "include_input", "upright"} and query["upright"]["schema"]["default"] is False
    assert "upright" in query["upright"]["description"]
    assert client.get("/docs").status_code == 200


def test_upload_matches_the_cli_path(client, classifier, test_images):
    """Dataset images and phone photos: same preprocessing and same numbers as `fmnist predict`."""
    x, _ = test_images
    files = [("file", ("dataset.png", png(x[0]), "image/png")),
             ("file", ("photo.jpg", phone_photo(x[1]), "image/jpeg"))]
    response = client.post("/v1/predict?top=2&include_input=true", files=files)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["name"] for p in predictions] == ["dataset.png", "photo.jpg"]
    for prediction, payload in zip(predictions, (png(x[0]), phone_photo(x[1])), strict=True):
        prepared = images.prepare(payload)
        expected = classifier.answer(prepared.image, k=2)[0]
        assert np.array_equal(np.array(prediction["input"], np.uint8), prepared.image)
        assert [t["class"] for t in prediction["top"]] == [t["class"] for t in expected["top"]]
        for name, p in expected["probabilities"].items():
            assert prediction["probabilities"][name] == pytest.approx(p, abs=1e-6)
        assert prediction["unsure"] == expected["unsure"] and prediction["inverted"] == prepared.inverted
        assert sum(prediction["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert predictions[0]["inverted"] is False and predictions[1]["inverted"] is True


def test_json_arrays_are_model_input_as_is(client, classifier, test_images):
    x, _ = test_images
    expected = classifier.predict_proba(x[:3])
    response = client.post("/v1/predict", json={"images": x[:3].tolist()})
    assert response.status_code == 200, response.text
    got = [[p["probabilities"][c] for c in data.CLASS_NAMES] for p in response.json()["predictions"]]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    one = client.post("/v1/predict", json={"image": (x[0] / 255).tolist(), "scale": 1}).json()["predictions"]
    assert len(one) == 1 and one[0]["top"][0]["class"] == data.CLASS_NAMES[int(expected[0].argmax())]
    assert "inverted" not in one[0] and len(one[0]["top"]) == 3


def test_upright_straightens_uploads_only_when_asked(client):
    """`?upright=true` reaches `prepare`: the tilted box comes back upright; JSON arrays are still taken as they are."""
    photo = tilted_garment()
    seen = {}
    for query in ("", "&upright=false", "&upright=true"):
        response = client.post(f"/v1/predict?include_input=true{query}",
                               files=[("file", ("tilted.png", photo, "image/png"))])
        assert response.status_code == 200, response.text
        seen[query] = np.array(response.json()["predictions"][0]["input"], np.uint8)
    np.testing.assert_array_equal(seen[""], images.prepare(photo).image)
    np.testing.assert_array_equal(seen["&upright=false"], seen[""])
    np.testing.assert_array_equal(seen["&upright=true"], images.prepare(photo, upright=True).image)
    assert np.abs(seen["&upright=true"].astype(int) - seen[""]).mean() > 5  # 19 gray levels apart
    array = np.zeros((28, 28), np.uint8)
    array[4:24, 10:18] = 200
    response = client.post("/v1/predict?upright=true&include_input=true", json={"image": array.tolist()})
    assert response.status_code == 200 and response.json()["predictions"][0]["input"] == array.tolist()
    assert_error(client.post("/v1/predict?upright=maybe", json={"image": array.tolist()}), 422, r"upright: ")


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("payload, pattern", [
    (b"just some text", r"not an image"),
    (png(np.full((40, 40), 200, np.uint8))[:60], r"truncated or corrupt"),
    (b"", r"empty"),
])
def test_bad_images_are_422_naming_the_file(client, payload, pattern):
    response = client.post("/v1/predict", files=[("file", ("upload.png", payload, "image/png"))])
    assert_error(response, 422, r"upload\.png: .*" + pattern)


def test_too_many_pixels_is_422_before_decoding(client):
    huge = png(np.zeros((1100, 1000), np.uint8))  # 1.1 MP over the 1 MP limit, but a small PNG
    assert_error(client.post("/v1/predict", files=[("file", ("big.png", huge, "image/png"))]), 422,
                 r"1,100,000 pixels, over the limit of 1,000,000")


def test_body_over_the_limit_is_413_declared_or_streamed(client):
    blob = b"\0" * 300_000
    assert_error(client.post("/v1/predict", files=[("file", ("big.png", blob, "image/png"))]), 413,
                 r"over the limit of .* MB")

    def chunks():  # no Content-Length: the limit must hold while streaming
        for _ in range(30):
            yield b"x" * 10_000

    response = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, r"over the limit")


def test_too_many_files_or_images_is_413(client, test_images):
    x, _ = test_images
    files = [("file", (f"{i}.png", png(x[i]), "image/png")) for i in range(9)]
    assert_error(client.post("/v1/predict", files=files), 413, r"9 files in one request, over the limit of 8")
    assert_error(client.post("/v1/predict", json={"images": x[:9].tolist()}), 413, r"over the limit of 8")
    many = [("file", (f"{i}.png", png(x[i]), "image/png")) for i in range(12)]  # past Starlette's own file limit
    assert_error(client.post("/v1/predict", files=many), 413, r"send at most 8 files")


@pytest.mark.parametrize("body, status, pattern", [
    ({"image": [[0] * 28] * 27}, 422, r"28x28 pixels, got 27x28"),
    ({"image": [[0] * 28] * 27 + [[0] * 5]}, 422, r"28x28 array of numbers"),
    ({"image": [["a"] * 28] * 28}, 422, r"28x28 array of numbers"),
    ({"image": [[300] * 28] * 28}, 422, r"from 0 to 255"),
    ({"image": [[0.5] * 28] * 28, "scale": 7}, 422, r'"scale" must be 255'),
    ({"images": []}, 422, r"non-empty list"),
    ({"pixels": []}, 422, r'"image".*"images"'),
    ([1, 2, 3], 422, r'"image".*"images"'),
    ({"image": [[0] * 28] * 28, "scale": True}, 422, r'"scale" must be 255'),
    ({"image": [[0] * 28] * 28, "images": None}, 422, r'"image".*"images"'),
    ({"image": None}, 422, r'"image".*"images"'),
])
def test_wrong_json_is_422(client, body, status, pattern):
    assert_error(client.post("/v1/predict", json=body), status, pattern)


def test_json_accepts_what_it_always_did(client):
    """Whole-number floats for "scale", numeric strings as pixels and unknown keys, as before the request model."""
    image = [[0] * 28] * 28
    for body in ({"image": image, "scale": 255.0}, {"image": [["0"] * 28] * 28, "scale": 1.0},
                 {"images": [image], "note": "ignored"}):
        assert client.post("/v1/predict", json=body).status_code == 200, body


# The parser refuses what would cost a stack, a quadratic int conversion or a 500; each a 4xx with one line.
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("body", [DEEP, b'{"image": ' + DEEP + b"}", b'{"images": [' + DEEP + b"]}"],
                         ids=["top", "image", "images"])
def test_deeply_nested_json_is_400(classifier, body):
    app = create_app(classifier, ServeSettings(max_bytes=1_000_000))
    with TestClient(app, base_url="http://localhost") as big_client:
        assert_error(post_json_text(big_client, body), 400, r"nested too deeply")


def post_json_text(client, text: str):
    """POST a JSON body written verbatim (numbers Python's json module would not write, or could not read)."""
    return client.post("/v1/predict", content=text, headers={"content-type": "application/json"})


def image_with(pixel: str) -> str:
    """A 28x28 JSON array of zeros with one pixel written as `pixel`."""
    rows = [["0"] * 28 for _ in range(28)]
    rows[5][7] = pixel
    return "[" + ",".join("[" + ",".join(row) + "]" for row in rows) + "]"


@pytest.mark.parametrize("where", ["pixel", "scale", "unknown key"])
def test_integers_over_4300_digits_are_400(client, where):
    huge = "9" * 5000  # json.loads raised ValueError here (Python's int digit limit): a 500
    body = {"pixel": '{"image": ' + image_with(huge) + "}", "scale": '{"image": [[0]], "scale": ' + huge + "}",
            "unknown key": '{"image": [[0]], "note": ' + huge + "}"}[where]
    assert_error(post_json_text(client, body), 400, r"number too long to read .*pixel values run 0\.\.255")


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1" + "0" * 400, "NaN", "Infinity"])
def test_numbers_beyond_a_float_are_422(client, number):
    assert_error(post_json_text(client, '{"image": ' + image_with(number) + "}"), 422,
                 r"pixel values must be numbers from 0 to 255")
    assert_error(post_json_text(client, '{"image": [[0]], "scale": ' + number + "}"), 422, r'"scale" must be 255')


def test_a_body_of_bad_values_costs_one_error_not_one_per_value():
    """Validation stops at the first bad pixel: collecting 2 million errors for a 10 MB body took 20 s of CPU."""
    bad = json.dumps({"images": [[["x"] * 28] * 28] * 50})
    with pytest.raises(ValidationError) as caught:
        PredictJson.model_validate_json(bad)
    assert caught.value.error_count() == 1


def test_json_body_is_parsed_off_the_event_loop(client, monkeypatch):
    """While one JSON body is being parsed, the server keeps answering other requests."""
    entered, release, threads = threading.Event(), threading.Event(), []
    parse = serve._json_images

    def slow_parse(*args):
        threads.append(threading.current_thread().name)
        entered.set()
        release.wait(10)
        return parse(*args)

    monkeypatch.setattr(serve, "_json_images", slow_parse)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/v1/predict", json={"image": [[0] * 28] * 28})
        assert entered.wait(10)
        assert client.get("/healthz").status_code == 200  # answered on the loop while the parse is still held
        assert not pending.done()
        release.set()
        assert pending.result(10).status_code == 200
    assert threads and threads[0].startswith("fmnist-quick")  # the quick lane: never behind huge decodes


def test_malformed_requests_are_4xx_json(client):
    assert_error(client.post("/v1/predict", content=b"{nope", headers={"content-type": "application/json"}), 400,
                 r"not valid JSON")
    assert_error(client.post("/v1/predict", content=b"x=1", headers={"content-type": "text/plain"}), 415,
                 r"unsupported content type 'text/plain'")
    assert_error(client.post("/v1/predict", data={"other": "field"}, files=[("x", ("a.txt", b"a", "text/plain"))]),
                 400, r"no image in the form")
    assert_error(client.post("/v1/predict?top=11", json={"image": [[0] * 28] * 28}), 422, r"top: .*less than")
    assert_error(client.post("/v1/predict", content=b"", headers={"content-length": "abc",
                                                                  "content-type": "application/json"}),
                 400, r"Content-Length")
    assert_error(client.get("/v2/nothing"), 404, r"Not Found")
    assert_error(client.get("/v1/predict"), 405, r"Method Not Allowed")


# ----------------------------------------------------------------------------------------------- concurrency
def test_concurrent_requests_each_get_their_own_answer(client, classifier, test_images):
    x, _ = test_images
    expected = classifier.predict_proba(x[:32]).argmax(1)

    def ask(i: int) -> str:
        if i % 2:
            response = client.post("/v1/predict", files=[("file", (f"{i}.png", png(x[i]), "image/png"))])
        else:
            response = client.post("/v1/predict", json={"image": x[i].tolist()})
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]["top"][0]["class"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(32)))
    assert answers == [data.CLASS_NAMES[k] for k in expected]
    assert client.get("/healthz").json()["images"] >= 32


def test_batcher_answers_queued_requests_in_one_forward_pass(classifier, test_images):
    """Requests that queue while the model is busy share one batch, and each gets back its own rows."""
    x, _ = test_images
    sizes = [1, 3, 1, 5, 2]
    starts = np.cumsum([0, *sizes[:-1]])

    async def scenario():
        batcher = Batcher(classifier, max_batch=256)
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.answer(x[s:s + n]) for s, n in zip(starts, sizes, strict=True)))
        finally:
            await batcher.stop()
        return results, batcher.batches

    results, batches = asyncio.run(scenario())
    assert batches == 1
    expected = classifier.answer(x[:sum(sizes)], k=10)
    assert [len(r) for r in results] == sizes
    assert [a for r in results for a in r] == expected


def test_batcher_respects_max_batch(classifier, test_images):
    x, _ = test_images

    async def scenario():
        batcher = Batcher(classifier, max_batch=4)
        await batcher.start()
        try:
            await asyncio.gather(*(batcher.answer(x[i:i + 2]) for i in range(0, 12, 2)))
        finally:
            await batcher.stop()
        return batcher.batches

    assert asyncio.run(scenario()) == 3


# ----------------------------------------------------------------------------------------------- CLI
def test_serve_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, run):
    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) == 2
    assert "no trained run under runs/" in capsys.readouterr().err
    assert main(["serve", str(run), "--port", "70000"]) == 2
    assert "--port 70000 is out of range" in capsys.readouterr().err
    for flags, message in ((["--max-mb", "nan"], "--max-mb nan is out of range; use 0.001..10000"),
                           (["--max-mb", "0.0001"], "--max-mb 0.0001 is out of range; use 0.001..10000"),
                           (["--threads", "-1"], "--threads -1 is out of range; use 1..1024"),
                           (["--workers", "0"], "--workers 0 is out of range; use 1..256")):
        assert main(["serve", str(run), *flags]) == 2
        assert f"fmnist: error: {message}\n" == capsys.readouterr().err
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(run), "--port", str(busy.getsockname()[1])]) == 2
    assert "choose another --port" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "fmnist: error:" in capsys.readouterr().err


@pytest.mark.parametrize("values, message", [
    ({"port": 70000}, "--port 70000 is out of range; use 0..65535"),
    ({"max_bytes": 20_000 * 1024 * 1024}, "--max-mb 20000 is out of range; use 0.001..10000"),
    ({"max_bytes": float("inf")}, "--max-mb inf is out of range; use 0.001..10000"),
    ({"max_pixels": 0}, "--max-pixels 0 is out of range; use 1..10000000000"),
    ({"max_images": 100_001}, "--max-images 100001 is out of range; use 1..100000"),
    ({"prepare_workers": 257}, "--workers 257 is out of range; use 1..256"),
    ({"max_batch": 0}, "--max-batch 0 is out of range; use 1..65536"),
    ({"torch_threads": 0}, "--threads 0 is out of range; use 1..1024"),
    ({"port": "8000"}, "--port must be a whole number, got '8000'"),
    ({"max_image": 3}, "unknown serve setting 'max_image'; did you mean 'max_images'?"),
])
def test_serve_settings_check_their_ranges(values, message):
    """ServeSettings holds the ranges `fmnist serve` used to check by hand, and names the flag in the error."""
    with pytest.raises(ConfigError) as caught:
        ServeSettings(**values)
    assert str(caught.value) == message


def test_serve_settings_take_megabytes_from_the_cli():
    """`--max-mb 0.001` (the smallest allowed) arrives as a float of bytes and is rounded, not refused."""
    assert ServeSettings(max_bytes=0.001 * serve.MiB).max_bytes == 1049
    assert ServeSettings(torch_threads=None, port=0).port == 0
    with pytest.raises(ValidationError):  # frozen: a running app's limits cannot drift
        ServeSettings().port = 1


def test_serve_without_the_extra_says_how_to_install(monkeypatch, capsys, run):
    import sys

    import fmnist

    monkeypatch.setitem(sys.modules, "fmnist.serve", None)
    monkeypatch.delattr(fmnist, "serve")
    assert main(["serve", str(run)]) == 2
    assert "pip install 'fmnist[serve]'" in capsys.readouterr().err


def test_latest_run_prefers_demo_then_newest(tmp_path):
    with pytest.raises(FileNotFoundError):
        latest_run(tmp_path / "runs")
    for name in ("old", "new"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "model.json").write_text(json.dumps({}))
    import os

    os.utime(tmp_path / "runs" / "old" / "model.json", (1, 1))
    assert latest_run(tmp_path / "runs").name == "new"
    (tmp_path / "runs" / "demo").mkdir()
    (tmp_path / "runs" / "demo" / "model.json").write_text("{}")
    os.utime(tmp_path / "runs" / "demo" / "model.json", (1, 1))
    assert latest_run(tmp_path / "runs").name == "demo"


def test_load_benchmark_runs_end_to_end(run, tmp_path):
    """benchmarks/serve_load.py on a tiny budget: starts the server, drives it, writes its table (numbers unchecked:
    timings belong to the benchmark, not to tests)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_load.py"
    done = subprocess.run([sys.executable, str(script), str(run), "--scenarios", "2x1", "1x4", "--seconds", "0.5",
                           "--warmup", "0.2", "--threads", "1", "--unbatched", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(next(tmp_path.glob("serve_load-*.json")).read_text())
    assert [row["scenario"] for row in report["scenarios"]] == ["2x1", "1x4", "16x1 unbatched"]
    assert all(row["errors"] == 0 and row["requests"] > 0 for row in report["scenarios"])
    assert "| 1x4 |" in (tmp_path / "serve_load.md").read_text()
