"""B14: what Streamlit's file watcher costs the server when the virtual environment lives in the project.

The README creates ``.venv`` inside the project folder, and Streamlit's default watcher (``auto``:
watchdog's inotify) watches the app's folder recursively, so every file that any process opens in
``.venv`` is an event for the server. This serves the digits app with the watcher ``auto`` and then
``none`` (the project's setting), opens one browser session (sessions start the watcher), runs
``--imports`` fresh Python processes that import torch, torchvision and plotly from the same
interpreter, and reports the server's processor seconds over that window and the number of
"queue overflowed" warnings in its log.

    python benchmarks/b14_file_watcher.py [--imports 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from b9_class_server import BROWSER_FLAGS, CHROMIUM, CIFAR_ARCHIVE, processor_seconds, start_server
from common import ROOT, save

IMPORTS = "import torch, torchvision, plotly"


def server_seconds(pid: int) -> float:
    return processor_seconds(pid)[pid][1]


def measure(watcher: str, imports: int) -> dict:
    from playwright.sync_api import sync_playwright

    os.environ["STREAMLIT_SERVER_FILE_WATCHER_TYPE"] = watcher  # Streamlit reads options from the environment
    with tempfile.TemporaryDirectory() as scratch:
        server, url = start_server(Path(scratch), "digits", CIFAR_ARCHIVE)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
                page = browser.new_page()
                page.goto(url)
                page.get_by_text("Run an attack to compare").first.wait_for(timeout=300_000)
                time.sleep(5)  # the page's own start-up work is over
                before, start = server_seconds(server.pid), time.perf_counter()
                for _ in range(imports):
                    subprocess.run([sys.executable, "-c", IMPORTS], check=True)
                time.sleep(5)
                window = time.perf_counter() - start
                spent = server_seconds(server.pid) - before
                browser.close()
            overflows = (Path(scratch) / "server.log").read_text().count("queue overflowed")
        finally:
            server.terminate()
            server.wait(timeout=60)
    return {"watcher": watcher, "server_cpu_s": round(spent, 2), "window_s": round(window, 1),
            "overflow_warnings": overflows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--imports", type=int, default=3)
    args = parser.parse_args()
    venv_inside = Path(sys.prefix).resolve().is_relative_to(ROOT)
    print(f"interpreter {sys.prefix} ({'inside' if venv_inside else 'outside'} the project folder)")
    rows = [measure(watcher, args.imports) for watcher in ("auto", "none")]
    for row in rows:
        print(f"watcher {row['watcher']:>4}: server used {row['server_cpu_s']:.2f} processor-s in "
              f"{row['window_s']:.0f} s, {row['overflow_warnings']} overflow warnings")
    save("b14_file_watcher", {"imports": args.imports, "venv_inside_project": venv_inside,
                              "load_average": os.getloadavg(), "rows": rows})


if __name__ == "__main__":
    main()
