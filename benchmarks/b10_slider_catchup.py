"""B10: how long the Explore page takes to catch up after quick slider key presses.

Serves the app (``streamlit run meansparse_app/app.py`` in a scratch folder), opens Explore in Chromium, attacks the
first image (so all four prediction panels are drawn), then, ``--rounds`` times, presses the arrow key
``--presses`` times as fast as Playwright can and records the seconds from the last press until the
page shows the final alpha. One browser session; nothing else of this benchmark runs meanwhile (other
processes on the machine may: the load average is recorded).

    python benchmarks/b10_slider_catchup.py [--model digits|cifar] [--presses 20] [--rounds 3]

``--model cifar`` serves the CIFAR-10 demo model on the test images of ``--cifar-archive``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from b9_class_server import BROWSER_FLAGS, CHROMIUM, CIFAR_ARCHIVE, alpha_pattern, start_server, verdict_at
from common import save


def slider(page):
    """The alpha slider's hidden range input, wherever the layout puts it."""
    return page.locator("[data-testid='stSlider']").filter(has_text="alpha (band").locator("input[type=range]").first


def catch_up(url: str, presses: int, rounds: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(300_000)
        page.goto(url)
        page.get_by_text(alpha_pattern(0.2)).first.wait_for()
        page.get_by_role("button", name="Attack", exact=True).click()
        page.get_by_text("True class").first.wait_for()
        # Keys pressed while the attack's page run is still going move the slider back to its old value
        # when that run ends (the page's alpha stays the new one): wait until the page is idle.
        page.locator("[data-testid='stStatusWidget']").wait_for(state="hidden")
        seconds, alpha = [], 0.2
        for _ in range(rounds):
            slider(page).focus()
            for _ in range(presses):
                page.keyboard.press("ArrowRight")
            pressed = time.perf_counter()
            alpha = round(alpha + 0.01 * presses, 2)
            page.get_by_text(verdict_at(alpha)).first.wait_for()
            page.locator("[data-testid='stStatusWidget']").wait_for(state="hidden")
            seconds.append(time.perf_counter() - pressed)
        browser.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["digits", "cifar"], default="digits")
    parser.add_argument("--presses", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cifar-archive", type=Path, default=CIFAR_ARCHIVE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server, url = start_server(Path(folder), args.model, args.cifar_archive)
        try:
            seconds = catch_up(url, args.presses, args.rounds)
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {"model": args.model, "presses": args.presses, "catch_up_s": [round(s, 2) for s in seconds],
              "median_s": round(statistics.median(seconds), 2), "load_average": os.getloadavg()}
    print(result)
    save("b10_slider_catchup", result)


if __name__ == "__main__":
    main()
