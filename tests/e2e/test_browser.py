"""The web page in real headless Chromium, against a real `fmnist serve` process on 127.0.0.1.

Chromium comes from Debian (`make test` installs it as root); Playwright drives that system browser, so no browser
download is needed. Outside CI the test skips when no Chromium is installed; in CI a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from fmnist import data
from fmnist.predict import Classifier

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")


def chromium_path() -> str:
    found = os.environ.get("FMNIST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        message = "no Chromium found: `make test` installs Debian's chromium as root, or set FMNIST_CHROMIUM"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def run(real_mlp_run):
    return real_mlp_run


@pytest.fixture(scope="module")
def server(run):
    """`fmnist serve RUN` as a real process; yields its base URL and stops it with SIGINT (Ctrl-C)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "fmnist", "serve", str(run), "--port", str(port),
                                "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the server did not start: {process.stdout.read()}")
            time.sleep(0.2)
    yield url
    process.send_signal(signal.SIGINT)
    try:
        assert process.wait(timeout=20) == 0, process.stdout.read()
    finally:
        process.kill()


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    with playwright.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844})  # a phone-sized screen
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(server)
    opened.wait_for_selector("#model b")
    yield opened
    context.close()
    assert not errors, errors


def test_upload_a_test_image_shows_the_right_class(page, run, real_data_source, tmp_path):
    (_, _), (x_test, y_test) = data.load_data(real_data_source.path)
    probabilities = Classifier.load(run).predict_proba(x_test[:200])
    confident = np.flatnonzero((probabilities.argmax(1) == y_test[:200]) & (probabilities.max(1) > 0.8))
    index = int(confident[0])  # an image this small model gets right, so the page must show its true class
    path = tmp_path / "test-image.png"
    Image.fromarray(x_test[index]).save(path)

    assert "test accuracy" in page.inner_text("#model")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#answer[data-class]")
    assert page.get_attribute("#answer", "data-class") == data.CLASS_NAMES[int(y_test[index])]
    assert page.locator("#bars li").count() == 10
    assert page.locator("#bars li.top .name").inner_text() == data.CLASS_NAMES[int(y_test[index])]
    assert page.is_visible("#original")


def test_drawing_on_the_canvas_shows_bars(page):
    box = page.locator("#pad").bounding_box()
    left, top, side = box["x"], box["y"], box["width"]
    page.mouse.move(left + 0.3 * side, top + 0.15 * side)
    page.mouse.down()
    for fx, fy in ((0.7, 0.15), (0.75, 0.85), (0.55, 0.85), (0.5, 0.4), (0.45, 0.85), (0.25, 0.85), (0.3, 0.15)):
        page.mouse.move(left + fx * side, top + fy * side, steps=6)
    page.mouse.up()
    page.wait_for_selector("#answer[data-class]")
    assert page.locator("#bars li").count() == 10
    page.wait_for_function("() => [...document.querySelectorAll('#bars .fill')].every(n => n.style.width)")
    widths = page.eval_on_selector_all("#bars .fill", "nodes => nodes.map(n => parseFloat(n.style.width))")
    assert sum(widths) == pytest.approx(100, abs=1.5)  # the bars are the 10 probabilities
    page.wait_for_timeout(400)  # the bars grow with a 0.25 s transition
    assert page.locator("#bars li.top .fill").bounding_box()["width"] > 0.05 * box["width"]  # and are drawn
    seen = page.eval_on_selector("#seen", "c => Array.from(c.getContext('2d').getImageData(0, 0, 28, 28).data)")
    assert max(seen) > 200  # the model's 28x28 view shows the drawing, light on black
    assert page.is_hidden("#error")


def test_a_bad_file_shows_the_servers_message(page, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image at all")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#error:not([hidden])")
    assert "not an image" in page.inner_text("#error")
