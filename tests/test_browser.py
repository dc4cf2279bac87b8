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


def serve(folder: Path, data: Path):
    """``streamlit run app.py`` on a free local port in ``folder``, reading data from ``data``; yields its URL."""
    port = free_port()
    log = folder / "server.log"
    env = {**os.environ, "MEANSPARSE_DATA": str(data), "MEANSPARSE_MODELS": str(folder / "models"),
           "MEANSPARSE_CACHE": str(folder / ".cache")}
    # A log file, not a pipe: nobody reads a pipe while tests run, and once its 64 KiB buffer was full
    # the server's next log line blocked the thread writing it. Seen after AutoAttack: the file
    # watcher's thread, stuck in a warning, held the lock the event loop needed to close a session,
    # and every later page load timed out.
    with log.open("w") as output:  # the server writes to its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "meansparse_app" / "app.py"), "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
            cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"streamlit exited: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("streamlit did not answer within 90 s")
    yield url
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:  # a loaded machine: do not leave it behind
        process.kill()


@pytest.fixture(scope="module")
def served_folder(tmp_path_factory) -> Path:
    """The server's working folder: its models/, data/ and .cache/ (empty at first)."""
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="module")
def server(served_folder):
    """The app in a scratch folder with no data (the offline default: digits)."""
    yield from serve(served_folder, served_folder / "data")


@pytest.fixture(scope="module")
def cifar_server(tmp_path_factory, shared_cifar10):
    """The app with CIFAR-10 from ../shared: it opens on the CIFAR-10 demo model."""
    yield from serve(tmp_path_factory.mktemp("served-cifar"), shared_cifar10.parent)


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        yield browser
        browser.close()


def open_page(browser, url: str, width: int = 1400, height: int = 1000):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(90_000)
    page.goto(url)
    return page


def saved_session(browser, url: str, name: str):
    """A fresh browser context, hence a fresh app session; its last view is saved as ``end-<name>.png``."""
    page = open_page(browser, url)
    yield page
    page.screenshot(path=SHOTS / f"end-{name}.png", full_page=True)
    page.context.close()


@pytest.fixture
def page(server, browser, request):
    yield from saved_session(browser, server, request.node.name)


def alpha_slider(page):
    return page.locator("[data-testid='stMain'] [data-testid='stSlider']").first


def move_alpha(page, presses: int) -> None:
    """Streamlit hides the slider's range input: focus it and press arrow keys (0.01 each)."""
    alpha_slider(page).locator("input[type=range]").focus()
    for _ in range(presses):
        page.keyboard.press("ArrowRight")


def text_of(page) -> str:
    return page.locator("[data-testid='stMain']").inner_text()


def no_error_on(page) -> None:
    text = text_of(page)
    assert "Traceback" not in text and "Something went wrong" not in text, text[-2000:]
    assert not page.locator("[data-testid='stException']").count(), text[-2000:]


def test_opens_slides_attacks_and_shows_layers(page):
    expect = sync_api.expect
    expect(page.get_by_text("Run an attack to compare")).to_be_visible()
    expect(page.get_by_text("alpha 0.2 says")).to_be_visible()
    page.screenshot(path=SHOTS / "1-explore.png", full_page=True)

    move_alpha(page, 10)
    expect(page.get_by_text("alpha 0.3 says")).to_be_visible()
    page.screenshot(path=SHOTS / "2-slider.png", full_page=True)

    page.get_by_role("button", name="Attack", exact=True).click()
    expect(page.get_by_text(re.compile(r"^True class"))).to_be_visible()
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


def tap_names(statistics: Path) -> list[str]:
    """The taps of the statistics saved at ``statistics``, in forward order."""
    from meansparse_core.statistics import Statistics

    return [tap.name for tap in Statistics.load(statistics).tap_list]


def chart_categories(page) -> list[list[str]]:
    """The x values of every trace of every Plotly chart on the page, as text.

    Numeric x values may reach the browser as Plotly's packed typed arrays (an object, not a list);
    names never do, so only plain lists are read."""
    return page.evaluate("""() => [...document.querySelectorAll('.js-plotly-plot')].flatMap(
        chart => (chart.data || []).map(trace => (Array.isArray(trace.x) ? trace.x : []).map(String)))""")


def depth_charts_name(page, taps: list[str]) -> None:
    """The Layers page's charts across depth are drawn, each with one point per tap, in forward order."""
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 4")
    over_depth = [xs for xs in chart_categories(page) if len(xs) == len(taps)]
    assert over_depth and all(xs == taps for xs in over_depth), (taps, over_depth)


def choose_imagenet_model(page, name: str) -> None:
    """The sidebar's RobustBench zoo, ImageNet models, the one named ``name``."""
    expect, sidebar = sync_api.expect, page.locator("[data-testid='stSidebar']")
    sidebar.get_by_role("radiogroup", name="Source").get_by_text("RobustBench zoo").click()
    expect(sidebar.get_by_text("Search names")).to_be_visible()
    sidebar.get_by_role("combobox", name="Dataset").first.click()
    page.get_by_role("option", name="imagenet", exact=True).click()
    expect(sidebar.get_by_text("fits a laptop: up to 30M parameters")).to_be_visible()
    sidebar.get_by_role("combobox", name="Model", exact=True).click()
    page.get_by_role("option", name=re.compile(name)).click()


TOP5_NAMES = ".js-plotly-plot .yaxislayer-above text"  # the class names on every top-5 subplot's axis


def top5_names(page, panels: int) -> list[str]:
    """The class names on the top-5 charts once ``panels`` of them are drawn, whole: long names are cut on
    the axis ("Greater Swiss M…"), whole on hover."""
    from meansparse_core.data import imagenet_classes

    ticks = page.locator(TOP5_NAMES)
    sync_api.expect(ticks.nth(5 * panels - 1)).to_be_attached()
    names = imagenet_classes()
    return [next((n for n in names if n.startswith(t[:-1])), t) if t.endswith("…") else t
            for t in ticks.all_text_contents()]


def test_a_photo_on_an_imagenet_model_gets_real_class_names(page, served_folder, tmp_path):
    """A 4000x3000 phone photo (EXIF-rotated) on a random-weight ImageNet ResNet-18."""
    from meansparse_core.data import imagenet_classes
    from test_photos import photo_jpeg, random_imagenet_folder

    expect = sync_api.expect
    random_imagenet_folder(served_folder)
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(photo_jpeg())
    expect(page.get_by_text("Run an attack to compare")).to_be_visible()
    choose_imagenet_model(page, "Salman2020Do_R18")
    uploader = page.locator("[data-testid='stMain'] [data-testid='stFileUploader'] input[type=file]")
    expect(uploader).to_be_attached()  # beside the built-in photos: no ImageNet folder is needed
    uploader.set_input_files(str(photo))
    expect(page.get_by_text("what the model sees")).to_be_visible()
    verdict = page.get_by_text(re.compile("Clean image, true class unknown: the base model says"))
    expect(verdict).to_be_visible()
    said = re.search(r"base model says (.+), MeanSparse at alpha", verdict.inner_text()).group(1)
    top5 = top5_names(page, 2)  # base and MeanSparse, clean
    names = set(imagenet_classes())
    assert said in names and len(top5) >= 10 and set(top5) <= names, (said, top5)
    no_error_on(page)
    page.screenshot(path=SHOTS / "7-photo-imagenet.png", full_page=True)
    page.locator(TOP5_NAMES).first.scroll_into_view_if_needed()
    page.screenshot(path=SHOTS / "8-photo-imagenet-top5.png", full_page=True)


# --- an ImageNet model on a machine with no ImageNet data and no statistics --------------------


@pytest.fixture(scope="module")
def bare_folder(tmp_path_factory) -> Path:
    """A server folder holding a random-weight ImageNet ResNet-18's weights and nothing else: no
    statistics (the other servers' folders get some) and no data."""
    from test_photos import random_imagenet_weights

    folder = tmp_path_factory.mktemp("served-bare")
    random_imagenet_weights(folder)
    return folder


@pytest.fixture(scope="module")
def bare_server(bare_folder):
    yield from serve(bare_folder, bare_folder / "data")


@pytest.fixture
def bare_page(bare_server, browser, request):
    yield from saved_session(browser, bare_server, request.node.name)


def test_no_data_imagenet_model_estimates_statistics_and_attacks_a_builtin_photo(bare_page, bare_folder):
    """Statistics from the BatchNorm layers and the built-in photos, a built-in photo attacked, alpha
    moved, the layers looked at: all with no ImageNet image on the machine."""
    from meansparse_core.batchnorm_statistics import builtin_source
    from meansparse_core.data import imagenet_classes
    from meansparse_core.models import find_model
    from meansparse_core.photos import PHOTOS
    from meansparse_core.statistics import Statistics
    from meansparse_core.statistics_lookup import statistics_path
    from test_photos import R18

    page, expect = bare_page, sync_api.expect
    sidebar = page.locator("[data-testid='stSidebar']")
    expect(page.get_by_text("Run an attack to compare")).to_be_visible()
    choose_imagenet_model(page, "Salman2020Do_R18")
    expect(sidebar.get_by_text("has no MeanSparse statistics")).to_be_visible()
    sidebar.get_by_role("button", name="Estimate without training images").click()
    expect(sidebar.get_by_text(re.compile("^Statistics: no training images: BatchNorm layers at"))).to_be_visible()
    saved = statistics_path(find_model(R18), "imagenet", cache=bare_folder / ".cache" / "stats")
    taps = Statistics.load(saved).taps
    sources = {"BatchNorm" if t.source.startswith("BatchNorm ") else t.source for t in taps}
    assert sources == {"BatchNorm", builtin_source(len(PHOTOS))}, sources  # both kinds, nothing else
    sidebar.get_by_text("Where each layer's statistics come from").click()
    listed = sidebar.locator("[data-testid='stExpander']").filter(has_text="Where each layer's")
    for tap in taps:  # expect waits: the expander's body is shown a moment after the click
        expect(listed).to_contain_text(f"{tap.tap.name}: {tap.source}")
    page.screenshot(path=SHOTS / "bare-1-statistics.png", full_page=True)

    coffee = next(p for p in PHOTOS if p.imagenet_class == "espresso")
    page.locator("[data-testid='stColumn']").filter(has_text=coffee.title).get_by_role("button", name="Pick").click()
    expect(page.get_by_text(f"clean: {coffee.title} (espresso)")).to_be_visible()
    page.get_by_role("combobox", name="Attack").click()
    page.get_by_role("option", name="fgsm", exact=True).click()
    page.get_by_role("button", name="Attack", exact=True).click()
    expect(page.get_by_text(re.compile("^Adversarial example: fgsm"))).to_be_visible()
    expect(page.get_by_text(re.compile(r"^True class espresso, alpha 0.2: "))).to_be_visible()
    move_alpha(page, 5)
    expect(page.get_by_text(re.compile(r"^True class espresso, alpha 0.25: "))).to_be_visible()
    top5 = top5_names(page, 4)  # base and MeanSparse, clean and adversarial
    assert len(top5) == 20 and set(top5) <= set(imagenet_classes()), top5
    no_error_on(page)
    page.screenshot(path=SHOTS / "bare-2-attack.png", full_page=True)

    page.get_by_role("link", name="Layers").click()
    expect(page.get_by_text(f"Image: {coffee.title} (espresso)")).to_be_visible()
    expect(page.get_by_text("Fraction of values replaced").first).to_be_visible()
    depth_charts_name(page, tap_names(saved))
    no_error_on(page)
    page.screenshot(path=SHOTS / "bare-3-layers.png", full_page=True)


# --- the CIFAR-10 demo model, as a lecture uses it ----------------------------------------------


@pytest.fixture
def cifar_page(cifar_server, browser, request):
    yield from saved_session(browser, cifar_server, request.node.name)


def cifar_statistics() -> Path:
    """The statistics shipped with the CIFAR-10 demo model the app opens on."""
    from meansparse_core.models import bundled_statistics_path, preferred_bundled

    return bundled_statistics_path(preferred_bundled("cifar10"))


# First of the CIFAR-10 tests: the others then load pages from a server whose sessions closed after an
# AutoAttack run (that once stalled the server, see serve()).
def test_cifar_autoattack_on_explore(cifar_server, cifar_page):
    page, expect = cifar_page, sync_api.expect
    expect(page.get_by_text("Run an attack to compare")).to_be_visible()
    page.get_by_role("combobox", name="Attack").click()
    page.get_by_role("option", name="autoattack", exact=True).click()
    page.get_by_role("button", name="Attack", exact=True).click()
    expect(page.get_by_text("Adversarial example: autoattack")).to_be_visible(timeout=600_000)
    no_error_on(page)
    page.screenshot(path=SHOTS / "cifar-1-autoattack.png", full_page=True)
    # The server goes on serving other sessions (page loads once stalled for minutes after this attack).
    other = open_page(page.context.browser, cifar_server)
    expect(other.get_by_text("Run an attack to compare")).to_be_visible()
    other.context.close()


def test_cifar_layers_charts_show_every_tap(cifar_page):
    page, expect = cifar_page, sync_api.expect
    expect(page.get_by_text("Run an attack to compare")).to_be_visible()
    page.get_by_role("link", name="Layers").click()
    expect(page.get_by_text("Fraction of values").first).to_be_visible(timeout=300_000)
    depth_charts_name(page, tap_names(cifar_statistics()))
    no_error_on(page)
    page.screenshot(path=SHOTS / "cifar-2-layers.png", full_page=True)


def test_cifar_shared_link_restores_alpha_and_image(cifar_server, browser):
    page, expect = open_page(browser, f"{cifar_server}/?page=layers&image=17&alpha=0.45&attack=pgd&seed=3"), sync_api.expect
    expect(page.get_by_role("heading", name="Layers")).to_be_visible(timeout=300_000)
    expect(page.get_by_text("Image: test image 17")).to_be_visible()
    expect(page.get_by_text("Adversarial example: pgd eps 8/255, 10 steps, seed 3")).to_be_visible()
    expect(alpha_slider(page).locator("input[type=range]")).to_have_value("0.45")
    expect(page.get_by_text("Fraction of values").first).to_be_visible(timeout=300_000)
    no_error_on(page)
    page.screenshot(path=SHOTS / "cifar-3-shared-link.png", full_page=True)
    page.context.close()


def test_cifar_presentation_layout_at_1280x720(cifar_server, browser):
    """Opened from a link with the attack in it (as a lecturer would), nothing scrolled: all of it in view."""
    url = f"{cifar_server}/?layout=presentation&image=17&attack=pgd&target=base"
    page, expect = open_page(browser, url, 1280, 720), sync_api.expect
    expect(page.get_by_text(re.compile(r"^True class")).first).to_be_visible(timeout=300_000)
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 1")
    page.screenshot(path=SHOTS / "cifar-4-presentation-1280x720.png")  # what the room sees
    page.screenshot(path=SHOTS / "cifar-4-presentation-full.png", full_page=True)
    in_view = {
        "alpha slider": alpha_slider(page),
        "clean image": page.get_by_text("clean: test image").first,
        "adversarial image": page.get_by_text("adversarial", exact=True).first,
        "predictions": page.locator(".js-plotly-plot").first,
    }
    for what, element in in_view.items():
        box = element.bounding_box()
        assert box and 0 <= box["y"] and box["y"] + box["height"] <= 720, f"{what} is out of view: {box}"
    images = page.locator("[data-testid='stMain'] [data-testid='stImage']").filter(
        has_text=re.compile(r"^(clean: |perturbation x|adversarial$)")).locator("img")
    expect(images).to_have_count(3)
    widths = [images.nth(i).bounding_box()["width"] for i in range(3)]
    assert max(widths) - min(widths) < 1, f"clean, perturbation and adversarial drawn at {widths} px"
    titles = page.locator(".js-plotly-plot").first.locator(".g-gtitle, .annotation-text").all_text_contents()  # SVG text has no innerText
    assert sum("MeanSparse" in t or "base" in t for t in titles) == 4, titles
    chart = page.locator(".js-plotly-plot").first.bounding_box()  # h16b: no title runs past the chart's edge
    ends = [t.bounding_box()["x"] + t.bounding_box()["width"] for t in page.locator(".js-plotly-plot").first.locator(".annotation-text").all()]
    assert max(ends) <= chart["x"] + chart["width"], f"a panel title is cut off: {ends} vs {chart}"
    page.get_by_text("Compare two alphas").click()  # h16c: two alphas, compact: all of it still in view
    expect(page.locator(".js-plotly-plot")).to_have_count(2)
    page.screenshot(path=SHOTS / "cifar-5-presentation-two-alphas-1280x720.png")
    for element in (alpha_slider(page), page.get_by_text("clean: test image").first, *page.locator(".js-plotly-plot").all()):
        box = element.bounding_box()
        assert box and 0 <= box["y"] and box["y"] + box["height"] <= 720, f"out of view with two alphas: {box}"
    no_error_on(page)
    page.context.close()


def protocol_client():
    """benchmarks/protocol_client.py: B15's browserless Streamlit client."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("protocol_client", ROOT / "benchmarks" / "protocol_client.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def test_protocol_client_sees_the_verdict_the_browser_shows(server, page):
    """B15 measures with protocol clients: the same steps give the same verdict text as in the browser."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    def verdict(texts: list[str]) -> str:
        return next(t for t in texts if re.match(r"True class .*, alpha 0.25: ", t))

    async def client_steps(image: str) -> str:
        client = await protocol_client().ProtocolClient.connect(server)
        try:
            await client.rerun()
            await client.click(f"pick_{image}")
            await client.click("FormSubmitter:attack-Attack")
            return verdict((await client.set_value("alpha", 0.25)).texts)
        finally:
            await client.close()

    expect = sync_api.expect
    expect(page.get_by_text("Run an attack to compare")).to_be_visible()
    pick = page.locator("[class*='st-key-pick_']").filter(has=page.locator("button:enabled")).first
    image = re.search(r"st-key-pick_(\d+)", pick.get_attribute("class")).group(1)
    with ThreadPoolExecutor(1) as thread:  # Playwright's sync API holds this thread's event loop
        shown = thread.submit(lambda: asyncio.run(client_steps(image))).result()
    pick.locator("button").click()
    expect(page.get_by_text(re.compile(rf"^clean: test image {image}\b"))).to_be_visible()
    page.get_by_role("button", name="Attack", exact=True).click()
    expect(page.get_by_text(re.compile(r"^True class .*, alpha 0.2: "))).to_be_visible()
    move_alpha(page, 5)
    in_browser = page.get_by_text(re.compile(r"^True class .*, alpha 0.25: "))
    expect(in_browser).to_be_visible()
    assert in_browser.inner_text() == shown
