"""B5: what the app recomputes when the slider moves, and one live attack, on the bundled demo models (CPU).

For each demo model, medians over ``--rounds`` repeats of:

* ``explore``: what the Explore view recomputes for a new alpha: top-5 of the base and the
  sparsified model on the clean and the adversarial image;
* ``layers``: what the Layers view recomputes: probes of every tap (summaries and histogram samples)
  and the histograms of the shown tap;
* ``live_panel``: the accuracy figures both views show (clean and transfer accuracy of the
  sparsified model on its 50-image set, ``LIMITS.live_set``) at an alpha not seen before;
* ``pgd10``: one PGD-10 attack on one image against the sparsified model;
* ``app_rerun_explore`` / ``app_rerun_layers``: a slider move in the real app (Streamlit's AppTest:
  the whole script rerun, server side, charts serialised), so Streamlit's own cost is included;
* ``startup``: ``streamlit run meansparse_app/app.py`` until a browser (Debian's chromium via Playwright, when
  installed) shows the first interactive Explore page, and the server's peak memory (VmHWM) then.

Test images are random (timings do not depend on content; no dataset is needed).

    python benchmarks/b5_interactivity.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, save
from meansparse_core import attach
from meansparse_core.models import bundled_models, bundled_statistics_path, load_model
from meansparse_core.probes import probe
from meansparse_core.statistics import Statistics
from meansparse_core.attack_choice import AttackChoice
from meansparse_core.limits import LIMITS
from meansparse_core.live_accuracy import LiveAccuracy
from meansparse_core.one_image import attack_image, compare

def median_seconds(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def library_timings(spec, rounds: int) -> dict:
    model = load_model(spec)
    sparse = attach(model, Statistics.load(bundled_statistics_path(spec)))
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(spec.input_size, generator=generator)
    live_images = torch.rand(LIMITS.live_set, *spec.input_size, generator=generator)
    live_labels = torch.randint(0, spec.num_classes, (LIMITS.live_set,), generator=generator)
    live = LiveAccuracy(live_images, live_labels, live_images.flip(-1), "random")
    adversarial = attack_image(sparse, image, 0, AttackChoice(steps=10, target="base"))
    alphas = iter(np.linspace(0.05, 1.0, 10_000))

    def explore():
        compare(sparse, image, adversarial, 0, float(next(alphas)), spec.class_names)

    def layers():
        alpha = float(next(alphas))
        probes = probe(model, sparse.stats, image[None], adversarial[None], alpha)
        for sample in (probes[0].channel_values, probes[0].standardized):
            edges = sample.edges(60)
            for values in sample.arrays():
                np.histogram(values, edges)

    pgd = AttackChoice(attack="pgd", eps=8, steps=10, target="sparse")
    return {
        "explore": median_seconds(explore, rounds),
        "layers": median_seconds(layers, rounds),
        "live_panel": median_seconds(lambda: live.at(sparse, float(next(alphas))), rounds),
        "pgd10": median_seconds(lambda: attack_image(sparse, image, 0, pgd, alpha=0.2), max(5, rounds // 4)),
    }


def app_rerun_timings(rounds: int) -> dict:
    """Slider moves in the running app on its default model (the CIFAR-10 demo when CIFAR-10 is found), page by page."""
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(ROOT / "meansparse_app" / "app.py"), default_timeout=300).run()
    app.button(key="FormSubmitter:attack-Attack").click().run()
    timings = {}
    for page, path in (("explore", None), ("layers", "views/layers.py")):
        if path:
            app.switch_page(path).run()
        alphas = iter(np.round(np.linspace(0.05, 1.0, rounds + 1), 2))
        timings[f"app_rerun_{page}"] = median_seconds(
            lambda: app.slider(key="alpha").set_value(float(next(alphas))).run(), rounds)
        assert not app.exception, app.exception
    return timings


def startup_timing(chromium: str = "/usr/bin/chromium", port: int = 8765) -> dict:
    """Seconds from ``streamlit run`` to the first interactive Explore page, and the server's peak RSS."""
    if not shutil.which(chromium):
        return {"skipped": f"no browser at {chromium}"}
    from playwright.sync_api import sync_playwright

    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "meansparse_app" / "app.py"), "--server.headless",
                               "true", "--server.port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run"])
            page = browser.new_page()
            for _ in range(240):
                try:
                    page.goto(f"http://127.0.0.1:{port}", timeout=2_000)
                    break
                except Exception:  # the server is not listening yet
                    time.sleep(0.25)
            page.get_by_text("Run an attack to compare").wait_for(timeout=180_000)
            seconds = time.perf_counter() - start
            browser.close()
        status = Path(f"/proc/{server.pid}/status").read_text()
        peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
        return {"seconds_to_interactive": seconds, "server_peak_rss_mb": peak_kb / 1024}
    finally:
        server.terminate()
        server.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"rounds": args.rounds, "models": {}}
    for spec in bundled_models():
        results["models"][spec.key] = library_timings(spec, args.rounds)
    results["app_default_model"] = app_rerun_timings(min(args.rounds, 10))
    results["startup"] = startup_timing()
    print(f"{'model':28} {'explore':>10} {'layers':>10} {'live panel':>10} {'pgd-10':>10}   (median seconds)")
    for key, t in results["models"].items():
        print(f"{key:28} {t['explore']:10.4f} {t['layers']:10.4f} {t['live_panel']:10.4f} {t['pgd10']:10.4f}")
    app = results["app_default_model"]
    print(f"app slider rerun (default model): explore {app['app_rerun_explore']:.3f} s, "
          f"layers {app['app_rerun_layers']:.3f} s")
    print(f"start-up: {results['startup']}")
    save("b5_interactivity", results)


if __name__ == "__main__":
    main()
