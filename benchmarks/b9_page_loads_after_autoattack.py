"""B9b: does one session's AutoAttack hold up other sessions' page loads, while it runs and after?

Serves the app (``streamlit run meansparse_app/app.py`` in a scratch folder, CIFAR-10 demo model), opens Explore in
Chromium and runs AutoAttack on the first image (a heavy job: the server's job queue). Meanwhile a
thread asks the server's health endpoint once a second; a new browser session loads the page while
the attack runs and ``--after`` times once it is shown. Page load: from ``goto`` until the page shows
its first image's predictions. Other processes share the CPU: the load average is recorded.

    python benchmarks/b9_page_loads_after_autoattack.py [--after 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from b9_class_server import BROWSER_FLAGS, CHROMIUM, CIFAR_ARCHIVE, start_server
from common import save

READY = "Run an attack to compare"
TIMEOUT_MS = 900_000


def health_probes(url: str, stop: threading.Event, seconds: list[float]) -> None:
    """Seconds each health request took (once a second until ``stop``); a failure counts as its timeout."""
    while not stop.is_set():
        start = time.perf_counter()
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=120).read()
        except OSError:
            pass
        seconds.append(time.perf_counter() - start)
        stop.wait(1)


def page_load(browser, url: str) -> float:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    start = time.perf_counter()
    page.goto(url, timeout=TIMEOUT_MS)
    page.get_by_text(READY).first.wait_for(timeout=TIMEOUT_MS)
    seconds = time.perf_counter() - start
    page.close()
    return seconds


def measure(url: str, after: int) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_text(READY).first.wait_for(timeout=TIMEOUT_MS)
        page.get_by_role("combobox", name="Attack").click()
        page.get_by_role("option", name="autoattack", exact=True).click()
        page.get_by_role("button", name="Attack", exact=True).click()
        started = time.perf_counter()
        during = page_load(browser, url)
        page.get_by_text("Adversarial example: autoattack").wait_for(timeout=TIMEOUT_MS)
        attack = time.perf_counter() - started
        loads = [page_load(browser, url) for _ in range(after)]
        browser.close()
    return {"autoattack_s": round(attack, 1), "page_load_during_s": round(during, 2),
            "page_loads_after_s": [round(s, 2) for s in loads]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", type=int, default=3)
    parser.add_argument("--cifar-archive", type=Path, default=CIFAR_ARCHIVE)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        server, url = start_server(Path(folder), "cifar", args.cifar_archive)
        stop, health = threading.Event(), []
        probes = threading.Thread(target=health_probes, args=(url, stop, health), daemon=True)
        probes.start()
        try:
            result = measure(url, args.after)
        finally:
            stop.set()
            server.terminate()
            server.wait(timeout=30)
    result.update(health_requests=len(health), slowest_health_s=round(max(health), 2),
                  load_average_before=load_before, load_average_after=os.getloadavg())
    print(result)
    save("b9_page_loads_after_autoattack", result)


if __name__ == "__main__":
    main()
