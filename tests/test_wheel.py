"""The project as a new user installs it: a wheel in a fresh virtual environment, run from an empty folder.

The wheel is built from this checkout and installed with no network (``--no-index --no-deps``); the fresh
environment sees the suite's own packages (torch, streamlit, ...) through a ``.pth`` file, not this checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh virtual environment holding only the wheel; returns its ``meansparse`` command and a clean env."""
    folder = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools builds in the source tree, and a stale build/ there would ship removed modules.
    source = folder / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "artifacts", ".cache",
                                                                "*.egg-info", "__pycache__", ".hypothesis", "carry"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(folder / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    [wheel] = (folder / "dist").glob("*.whl")
    environment = folder / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # The suite's packages, but not its editable install of this checkout: a path in a .pth file is added to
    # sys.path without its own .pth files (the editable finder) being run.
    (site / "suite.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the suite's own (editable) install is visible through suite.pth and must not count.
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                              "--ignore-installed", str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    home = folder / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MEANSPARSE_", "PYTHON", "XDG_", "TORCHINDUCTOR_"))}
    env.update(HOME=str(home), PATH=f"{environment / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return {"meansparse": str(environment / "bin" / "meansparse"), "env": env, "cache": home / ".cache" / "meansparse",
            "site": site}


@pytest.fixture
def empty_folder(tmp_path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def run(installed: dict, folder: Path, *args: str) -> str:
    done = subprocess.run([installed["meansparse"], *args], cwd=folder, env=installed["env"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_wheel_carries_the_library_the_app_and_the_bundled_models(installed, empty_folder):
    where = run(installed, empty_folder, "models", "--json")
    bundled = {row["key"] for row in json.loads(where) if row["key"].startswith("bundled/")}
    assert {"bundled/digits-cnn", "bundled/cifar-resnet9", "bundled/cifar-resnet9-w64"} <= bundled
    package = installed["site"] / "meansparse_app"
    assert (package / "app.py").is_file() and (package / ".streamlit" / "config.toml").is_file()
    assert list((package / "views").glob("*.py")) and (package / "ui" / "state.py").is_file()
    assert list(empty_folder.iterdir()) == []


def test_evaluate_from_an_empty_folder_writes_only_to_the_users_cache(installed, empty_folder):
    record = json.loads(run(installed, empty_folder, "evaluate", "--model", "bundled/digits-cnn", "--n", "20",
                            "--attack", "fgsm", "--eps", "32", "--alpha", "0.2", "--json"))
    assert record["n"] == 20 and 0 <= record["robust_acc"] <= record["clean_acc"] <= 1
    assert list(empty_folder.iterdir()) == []
    assert list((installed["cache"] / "results").iterdir()), "results are cached in the user's cache folder"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_meansparse_app_serves_explore_from_an_empty_folder(installed, empty_folder, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-dev.txt)")
    from test_browser import BROWSER_FLAGS, CHROMIUM, SHOTS

    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    port, log = free_port(), tmp_path / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen([installed["meansparse"], "app", "--server.headless", "true", "--server.port", str(port)],
                                  cwd=empty_folder, env=installed["env"], stdout=output, stderr=subprocess.STDOUT)
    url = f"http://localhost:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                    assert answer.read() == b"ok"
                break
            except OSError:
                assert server.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "the app did not answer its health check within 120 s"
                time.sleep(0.5)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)
            page.goto(url)
            sync_api.expect(page.get_by_text("1 · Pick an image")).to_be_visible()
            sync_api.expect(page.get_by_text("alpha 0.2 says")).to_be_visible()
            assert "Traceback" not in page.locator("[data-testid='stMain']").inner_text()
            # The app's own settings were read beside app.py: with Streamlit's defaults a local visitor gets a
            # Deploy button (toolbarMode "auto"); the app's settings say "viewer".
            assert page.get_by_role("button", name="Deploy").count() == 0
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=SHOTS / "wheel-explore.png", full_page=True)
            browser.close()
    finally:
        server.terminate()  # the launcher became the server: nothing is left behind
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    assert list(empty_folder.iterdir()) == []
