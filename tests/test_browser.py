"""End to end in a real browser: the app served by ``streamlit run``, driven by Playwright in Chromium.

Needs Debian's chromium (``apt-get install -y chromium``; ``.ci/run`` installs it) and the
``playwright`` Python package; Playwright's own browser download is not used. Screenshots of each
step go to ``artifacts/screenshots/`` (git-ignored).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("MEANSPARSE_CHROMIUM", "/usr/bin/chromium")
SHOTS = ROOT / "artifacts" / "screenshots"
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-dev.txt)")
sync_api.expect.set_options(timeout=90_000)  # the first page load reads the model and crafts the live set
pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_folder(tmp_path_factory) -> Path:
    """The server's working folder: its models/, data/ and .cache/ (empty at first)."""
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="module")
def server(served_folder):
    """``streamlit run app.py`` on a free local port, in a scratch folder with no data (offline default)."""
    folder = served_folder
    port = free_port()
    env = {**os.environ, "MEANSPARSE_DATA": str(folder / "data"), "MEANSPARSE_MODELS": str(folder / "models")}
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"streamlit exited: {process.stdout.read()[-2000:]}")
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("streamlit did not answer within 90 s")
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:  # still finishing a heavy run on a loaded machine
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(server, browser, request):
    """A fresh browser context, hence a fresh app session, per test; its last view is saved."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(90_000)
    page.goto(server)
    yield page
    page.screenshot(path=SHOTS / f"end-{request.node.name}.png", full_page=True)
    context.close()


def move_alpha(page, presses: int) -> None:
    """Streamlit hides the slider's range input: focus it and press arrow keys (0.01 each)."""
    slider = page.locator("[data-testid='stMain'] [data-testid='stSlider']").first
    slider.locator("input[type=range]").focus()
    for _ in range(presses):
        page.keyboard.press("ArrowRight")


def text_of(page) -> str:
    return page.locator("[data-testid='stMain']").inner_text()


def test_opens_slides_attacks_and_shows_layers(page):
    expect = sync_api.expect
    expect(page.get_by_text("Run an attack to compare")).to_be_visible()
    expect(page.get_by_text("alpha 0.2 says")).to_be_visible()
    page.screenshot(path=SHOTS / "1-explore.png", full_page=True)

    move_alpha(page, 10)
    expect(page.get_by_text("alpha 0.3 says")).to_be_visible()
    page.screenshot(path=SHOTS / "2-slider.png", full_page=True)

    page.get_by_role("button", name="Attack").click()
    expect(page.get_by_text("True class")).to_be_visible()
    expect(page.get_by_text("Adversarial example: pgd eps 32/255")).to_be_visible()
    assert "Traceback" not in text_of(page)
    page.screenshot(path=SHOTS / "3-attack.png", full_page=True)

    page.get_by_role("link", name="Layers").click()
    expect(page.get_by_text("Fraction of values replaced").first).to_be_visible()
    expect(page.get_by_text("of the adversarial values replaced")).to_be_visible()
    assert "Traceback" not in text_of(page)
    page.screenshot(path=SHOTS / "4-layers.png", full_page=True)


def test_uploads_are_used_or_refused_in_one_sentence(page, tmp_path):
    from PIL import Image

    expect = sync_api.expect
    picture, junk = tmp_path / "photo.png", tmp_path / "notes.png"
    Image.radial_gradient("L").resize((64, 48)).save(picture)
    junk.write_text("this is not an image")
    uploader = page.locator("[data-testid='stFileUploader'] input[type=file]")
    uploader.set_input_files(str(picture))
    expect(page.get_by_text("clean: photo.png (true class unknown)")).to_be_visible()
    uploader.set_input_files(str(junk))
    expect(page.get_by_text("could not be read as an image")).to_be_visible()
    expect(page.get_by_text("clean: photo.png (true class unknown)")).to_be_visible()  # the page keeps working
    assert "Traceback" not in text_of(page)
    page.screenshot(path=SHOTS / "5-bad-upload.png", full_page=True)


def test_own_checkpoint_is_calibrated_and_used(page, tmp_path):
    import torch

    from meansparse_core.models import find_model, load_model

    expect = sync_api.expect
    checkpoint = tmp_path / "my-digits.pt"
    torch.save(load_model(find_model("bundled/digits-cnn")).state_dict(), checkpoint)
    sidebar = page.locator("[data-testid='stSidebar']")
    expect(page.get_by_text("Run an attack to compare")).to_be_visible()
    move_alpha(page, 5)
    expect(page.get_by_text("alpha 0.25 says")).to_be_visible()
    sidebar.get_by_text("Your checkpoint").click()
    expect(sidebar.get_by_text(re.compile(r"\d\d models, \d+ with weights"))).to_be_visible()
    sidebar.get_by_role("combobox", name="Dataset").first.click()
    page.get_by_role("option", name="digits", exact=True).click()
    expect(sidebar.get_by_text("1 model,")).to_be_visible()
    sidebar.locator("[data-testid='stFileUploader'] input[type=file]").set_input_files(str(checkpoint))
    expect(sidebar.get_by_text("no MeanSparse statistics")).to_be_visible()
    sidebar.get_by_role("button", name="Calibrate").click()
    expect(sidebar.get_by_text("calibrated on")).to_be_visible()
    expect(page.get_by_text("alpha 0.25 says")).to_be_visible()  # the session kept its alpha
    assert "Traceback" not in text_of(page)
    page.screenshot(path=SHOTS / "6-checkpoint.png", full_page=True)


def test_a_photo_on_an_imagenet_model_gets_real_class_names(page, served_folder, tmp_path):
    """Issue 21: a 4000x3000 phone photo (EXIF-rotated) on a random-weight ImageNet ResNet-18."""
    from meansparse_core.data import imagenet_classes
    from test_photos import photo_jpeg, random_imagenet_folder

    expect = sync_api.expect
    random_imagenet_folder(served_folder)
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(photo_jpeg())
    sidebar = page.locator("[data-testid='stSidebar']")
    expect(page.get_by_text("Run an attack to compare")).to_be_visible()
    sidebar.get_by_role("radiogroup", name="Source").get_by_text("RobustBench zoo").click()
    expect(sidebar.get_by_text("Search names")).to_be_visible()
    sidebar.get_by_role("combobox", name="Dataset").first.click()
    page.get_by_role("option", name="imagenet", exact=True).click()
    expect(sidebar.get_by_text("fits a laptop: up to 30M parameters")).to_be_visible()
    sidebar.get_by_role("combobox", name="Model", exact=True).click()
    page.get_by_role("option", name=re.compile("Salman2020Do_R18")).click()
    expect(page.get_by_text("upload an image")).to_be_visible()
    page.locator("[data-testid='stMain'] [data-testid='stFileUploader'] input[type=file]").set_input_files(str(photo))
    expect(page.get_by_text("what the model sees")).to_be_visible()
    verdict = page.get_by_text(re.compile("Clean image, true class unknown: the base model says"))
    expect(verdict).to_be_visible()
    said = re.search(r"base model says (.+), MeanSparse at alpha", verdict.inner_text()).group(1)
    ticks = page.locator(".js-plotly-plot .yaxislayer-above text")  # every subplot's class names
    expect(ticks.nth(9)).to_be_attached()  # base and MeanSparse, five classes each
    top5 = ticks.all_text_contents()
    names = set(imagenet_classes())
    assert said in names and len(top5) >= 10 and set(top5) <= names, (said, top5)
    assert "Traceback" not in text_of(page) and not page.locator("[data-testid='stException']").count()
    page.screenshot(path=SHOTS / "7-photo-imagenet.png", full_page=True)
    ticks.first.scroll_into_view_if_needed()
    page.screenshot(path=SHOTS / "8-photo-imagenet-top5.png", full_page=True)
