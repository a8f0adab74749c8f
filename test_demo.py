"""demo.html in a real browser: headless Chromium, onnxruntime-web, the page's own preprocessing."""
import json
import os
import pathlib
import re
import shutil
import threading
import time

import numpy as np
import pytest

import infer
from conftest import HERE, MNIST_DATA_DIR

ORT_WEB = pathlib.Path(HERE, ".web", "node_modules", "onnxruntime-web")
ORT_WEB_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
# Digits as strokes, points in units of the pad's side.
STROKES = {
    "7": [[(0.25, 0.2), (0.75, 0.2), (0.5, 0.5), (0.4, 0.85)]],
    "1": [[(0.4, 0.25), (0.52, 0.15), (0.52, 0.85)]],
    "4": [[(0.6, 0.85), (0.6, 0.15), (0.22, 0.62), (0.8, 0.62)]],
}


def demo_version():
    """The onnxruntime-web version demo.html pins."""
    page = pathlib.Path(HERE, "demo.html").read_text()
    return re.search(r'const ORT_VERSION = "([^"]+)"', page).group(1)


@pytest.fixture(scope="module")
def ort_web():
    """The onnxruntime-web files the page loads, from npm's package in .web; skips without them."""
    if not all((ORT_WEB / "dist" / name).exists() for name in ORT_WEB_FILES):
        pytest.skip(f"no onnxruntime-web in .web (npm install --prefix .web "
                    f"onnxruntime-web@{demo_version()})")
    return ORT_WEB


@pytest.fixture(scope="module")
def browser(ort_web, tmp_path_factory):
    """Debian's headless Chromium under selenium; without a piece, a skip naming what to install."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("no chromium and chromedriver on PATH (apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync",
                 "--window-size=640,600", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(shutil.which("chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def serve(tmp_path):
    """serve(model_bytes or None): demo.html and onnxruntime-web (and model.onnx) in a folder on
    127.0.0.1, as `python -m http.server` serves them; returns the page's URL."""
    import functools
    import http.server

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # quiet, as the rest of the suite
            pass

    servers = []

    def start(model):
        folder = tmp_path / f"site{len(servers)}"
        folder.mkdir()
        files = [pathlib.Path(HERE, "demo.html")] + [ORT_WEB / "dist" / n for n in ORT_WEB_FILES]
        for path in files:
            (folder / path.name).symlink_to(path)
        if model is not None:
            (folder / "model.onnx").write_bytes(model)
        handler = functools.partial(Handler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/demo.html"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def open_demo(browser, url):
    """Loads the page and waits until it says something; returns the seconds until then."""
    from selenium.webdriver.support.ui import WebDriverWait

    start = time.perf_counter()
    browser.get(url)
    WebDriverWait(browser, 60).until(lambda b: b.execute_script(
        "return 'ready' in document.body.dataset"
        " || document.getElementById('status').classList.contains('problem')"))
    return time.perf_counter() - start


def draw(browser, strokes, pointer):
    """Draws strokes on the pad with a mouse, a finger or a pen, as pointer events."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    pad = browser.find_element("id", "pad")
    side = pad.size["width"] - 4  # its 2-pixel border
    builder = ActionBuilder(browser, mouse=PointerInput(pointer, pointer))
    for stroke in strokes:
        offsets = [(round((x - 0.5) * side), round((y - 0.5) * side)) for x, y in stroke]
        builder.pointer_action.move_to(pad, *offsets[0]).pointer_down()
        for offset in offsets[1:]:
            builder.pointer_action.move_to(pad, *offset)
        builder.pointer_action.pointer_up()
    builder.perform()


def page_reading(browser):
    """(the pad as PNG bytes, the page's 28 x 28 uint8 picture, its 10 probabilities, the 3 classes
    it lists), once the page has read the latest drawing."""
    import base64

    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda b: b.execute_script(
        "return document.getElementById('top3').dataset.version"
        " === document.getElementById('pad').dataset.version"))
    png, seen, probabilities, listed = browser.execute_script("""
        const seen = document.getElementById('seen').getContext('2d')
            .getImageData(0, 0, 28, 28).data;
        const top3 = document.getElementById('top3');
        return [document.getElementById('pad').toDataURL('image/png'), Array.from(seen),
                top3.dataset.probabilities || null,
                Array.from(top3.children, (item) => item.dataset.digit)];""")
    picture = np.array(seen, np.uint8).reshape(28, 28, 4)[..., :1]
    if probabilities is not None:
        probabilities = np.array(json.loads(probabilities), np.float32)
    return base64.b64decode(png.split(",", 1)[1]), picture, probabilities, [int(c) for c in listed]


@pytest.fixture(scope="module")
def demo_model(request):
    """(model.onnx bytes, state), exported by export.py: real MNIST's 1-epoch model where
    MNIST_DATA_DIR is set, so that the screenshot reads real digits; else the `exported` one."""
    if not MNIST_DATA_DIR:
        onnx_path, _, state, _ = request.getfixturevalue("exported")
        return onnx_path.read_bytes(), state
    state, onnx_bytes = request.getfixturevalue("real_exported")
    return onnx_bytes, state


def test_demo_page_reads_drawn_digits_as_infer_does(browser, serve, demo_model, tmp_path):
    from selenium.webdriver.common.actions import interaction

    model, state = demo_model
    seconds = open_demo(browser, serve(model))
    print(f"demo.html: ready {seconds:.2f} s after it was opened")
    assert browser.find_element("id", "status").text == "Draw a digit in the box."
    pointers = [interaction.POINTER_MOUSE, interaction.POINTER_TOUCH, interaction.POINTER_PEN]
    for i, (digit, strokes) in enumerate(STROKES.items()):
        browser.find_element("id", "clear").click()
        draw(browser, strokes, pointers[i % len(pointers)])
        png, picture, probabilities, listed = page_reading(browser)
        (tmp_path / f"pad{digit}.png").write_bytes(png)
        expected_picture = infer.mnist_like(str(tmp_path / f"pad{digit}.png"))
        assert np.abs(picture.astype(int) - expected_picture).max() <= 1, digit
        expected = np.asarray(infer.predict(state, picture[None]))[0]
        assert listed == list(np.argsort(-expected)[:3]), digit
        assert np.abs(probabilities - expected).max() < 1e-5, digit
        status = browser.find_element("id", "status").text
        print(f"drew a {digit} ({pointers[i % len(pointers)]}): the page reads a {listed[0]}, "
              f"{status!r}; its picture {np.abs(picture.astype(int) - expected_picture).max()} "
              f"from mnist_like's at most, probabilities "
              f"{np.abs(probabilities - expected).max():.2g} from infer.py's")
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(tmp_path / "demo.png"))
    if os.environ.get("DEMO_SCREENSHOT"):  # DEMO_SCREENSHOT=docs/demo.png: the README's picture
        shutil.copy(tmp_path / "demo.png", os.environ["DEMO_SCREENSHOT"])
    browser.find_element("id", "clear").click()
    assert page_reading(browser)[2:] == (None, [])
    assert browser.find_element("id", "status").text == "Draw a digit in the box."


@pytest.mark.parametrize("model, message", [
    (None, r"^No model.onnx beside this page: run `python export.py model.onnx` in this folder, "
           r"then reload.$"),
    (b"not a model", r"^model.onnx does not load \(.+\): export it again with `python export.py "
                     r"model.onnx`.$"),
])
def test_demo_page_says_what_is_wrong_with_the_model(browser, serve, model, message):
    open_demo(browser, serve(model))
    status = browser.find_element("id", "status")
    assert "problem" in status.get_attribute("class"), status.text
    assert re.match(message, status.text), status.text


def test_demo_page_opened_as_a_file_says_to_serve_it(browser):
    open_demo(browser, pathlib.Path(HERE, "demo.html").as_uri())
    status = browser.find_element("id", "status").text
    assert status.startswith("Open this page through a web server")


def test_demo_page_pins_the_onnxruntime_web_it_is_tested_with(ort_web):
    """The CDN fallback is the version the tests load from .web, its integrity hash that file's."""
    import base64
    import hashlib

    page = pathlib.Path(HERE, "demo.html").read_text()
    assert json.loads((ort_web / "package.json").read_text())["version"] == demo_version()
    script = (ort_web / "dist" / "ort.wasm.min.js").read_bytes()
    digest = base64.b64encode(hashlib.sha384(script).digest()).decode()
    assert f'const ORT_INTEGRITY = "sha384-{digest}";' in page
