"""B9: a class on one server: N students in their own browser sessions while two heavy jobs run.

Starts ``streamlit run meansparse_app/app.py`` on a free port (in a scratch folder, so nothing cached is reused),
opens one Chromium (Playwright) and, in separate browser contexts (separate app sessions):

1. two "heavy" sessions that each start an accuracy sweep on the Accuracy page (every test image,
   200 PGD steps, BPDA and Square with 5,000 queries: minutes of work), and keep them going;
2. then ``--sessions`` students at once, each: open Explore, pick its own gallery image (one of those
   not picked yet), attack it (the default PGD), move alpha ``--moves`` times with the keyboard, open
   Layers.

For each slider move it records the seconds from the last key press until the page shows the result
at the session's new alpha: the verdict above the top-5 bars ("True class 3, alpha 0.24: ..."),
drawn from the predictions at that alpha (slider-to-update latency); and the seconds until that page
run ended (the live accuracy panel below included). Every session gets alphas no other session uses
(0.2 + 0.01 * (i + 1 + sessions * move)), so a session that shows another's alpha, or another's
image, is a cross-session leak. Errors: any step that failed or timed out, and any error box or
traceback on a page. At the end it checks that the heavy jobs were still running or waiting,
closes their tabs and checks that a new sweep then starts at once (the closed sessions' jobs were
cancelled), and records the machine's load average (other processes share the CPU).

    python benchmarks/b9_class_server.py [--sessions 10] [--moves 5] [--heavy 2] [--model digits|cifar]

``--heavy 0`` leaves out the sweeps (a quick check that every step works).

``--model cifar`` serves the CIFAR-10 demo model, with the test images extracted from
``--cifar-archive`` (default ``../shared/datasets/cifar10-jpeg.tar.gz``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common import ROOT, save

CHROMIUM = os.environ.get("MEANSPARSE_CHROMIUM", "/usr/bin/chromium")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
CIFAR_ARCHIVE = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
STEP_TIMEOUT_MS = 180_000
FAILED_PAGE = re.compile(r"Traceback|Something went wrong")
JOB_STATE = re.compile(r"queued, position \d+|evaluation \d+ of")
SHOTS = ROOT / "artifacts" / "load-test"  # the server's log, and a screenshot of each session that failed a step
RUNNING = "[data-testid='stStatusWidget']"  # shown while the session's page runs


@dataclass
class Session:
    """What one student session did and saw."""

    number: int
    latencies: list[float] = field(default_factory=list)
    until_idle: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, model: str, archive: Path) -> tuple[subprocess.Popen, str]:
    """``streamlit run meansparse_app/app.py`` in ``folder``, serving the digits model, or the CIFAR-10 demo model with CIFAR-10 data.

    The server reads the app's own settings (``meansparse_app/.streamlit``, beside the script it runs).
    """
    data = folder / "data"
    data.mkdir()
    if model == "cifar":
        from meansparse_core.data import extract

        extract(archive, data)
    port = free_port()
    env = {**os.environ, "MEANSPARSE_DATA": str(data), "MEANSPARSE_MODELS": str(folder / "models"),
           "MEANSPARSE_CACHE": str(folder / ".cache")}
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "meansparse_app" / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=folder, env=env, stdout=(folder / "server.log").open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                return server, url
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"streamlit exited: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("streamlit did not answer within 120 s")


def alpha_pattern(alpha: float) -> re.Pattern:
    return re.compile(rf"alpha {alpha:g}(?![0-9])")


def verdict_at(alpha: float) -> re.Pattern:
    """The verdict above the predictions at ``alpha`` ("True class 3, alpha 0.4: ..."): other text on the
    page that names an alpha (the attack's description, hidden elements) must not count."""
    return re.compile(rf"^True class .*, alpha {alpha:g}: ")


async def idle(page) -> None:
    """Wait until the session's page run has ended."""
    await page.locator(RUNNING).wait_for(state="hidden")


async def main_text(page) -> str:
    return await page.locator("[data-testid='stMain']").inner_text()


async def check_page(page, where: str, session: Session) -> None:
    """Error boxes or tracebacks on the page count as errors."""
    text = await main_text(page)
    if FAILED_PAGE.search(text) or await page.locator("[data-testid='stException']").count():
        session.errors.append(f"{where}: the page shows an error: {text[:300]!r}")


async def screenshot(context, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    for page in context.pages:
        await page.screenshot(path=SHOTS / f"{name}.png", full_page=True)


async def open_app(context, url: str):
    page = await context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    await page.goto(url)
    await page.get_by_text(re.compile(r"^(Clean image|True class)")).first.wait_for()  # the first verdict
    # Acting on the page while its first run goes on is fine for the app (ui/threshold.py) but would
    # time that run's rest into the first step.
    await idle(page)
    return page


async def sweep_form(page):
    """Open the Accuracy page; its sweep form (Explore's attack form stays on screen until the page is drawn)."""
    await page.get_by_role("link", name="Accuracy").click()
    form = page.locator("[data-testid='stForm']").filter(has_text="Test images (N)")
    await form.wait_for()
    await idle(page)
    return form


async def heavy_session(browser, url: str, number: int, ready: asyncio.Event, done: asyncio.Event) -> dict:
    """Start an accuracy sweep as large as the page allows; report what the page says of it at the end."""
    from playwright.async_api import expect

    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = await open_app(context, url)
        form = await sweep_form(page)
        numbers = form.locator("input[type=number]")
        for index, value in ((0, await numbers.nth(0).get_attribute("max")), (2, "200"), (3, "5000")):
            await numbers.nth(index).fill(value)  # every test image allowed, 200 steps, 5,000 Square queries
            await numbers.nth(index).press("Tab")  # the value counts once the field loses focus
            await expect(numbers.nth(index)).to_have_value(value)
        await form.get_by_text("Also with Square").click()
        await form.get_by_role("button", name="Run").click()
        await page.get_by_text(JOB_STATE).first.wait_for()
        started = await main_text(page)
        ready.set()
        await done.wait()
        ended = await main_text(page)
        state = lambda text: next((line for line in text.splitlines() if JOB_STATE.search(line)), "finished")
        return {"session": number, "when_started": state(started), "at_the_end": state(ended)}
    except Exception as exc:  # reported, not raised: the students' figures still count
        ready.set()
        await screenshot(context, f"heavy-{number}")
        return {"session": number, "error": f"{exc.__class__.__name__}: {str(exc)[:300]}"}
    finally:
        await context.close()


async def late_session(browser, url: str) -> dict:
    """After the heavy sessions' tabs closed: does a new sweep start at once (their jobs were cancelled)?"""
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = await open_app(context, url)
        await (await sweep_form(page)).get_by_role("button", name="Run").click()
        start = time.perf_counter()
        await page.get_by_text(re.compile(r"evaluation \d+ of")).first.wait_for()
        return {"new_sweep_running_after_s": round(time.perf_counter() - start, 1)}
    except Exception as exc:
        await screenshot(context, "late")
        return {"error": f"{exc.__class__.__name__}: {str(exc)[:300]}"}
    finally:
        await context.close()


async def student(browser, url: str, session: Session, sessions: int, moves: int, everyone: list[Session]) -> None:
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = await open_app(context, url)
        # The gallery's first image is the one picked when the page opens: its button is disabled.
        picks = page.locator("[class*='st-key-pick_']").filter(has=page.locator("button:enabled"))
        await picks.first.wait_for()
        pick = picks.nth(session.number % await picks.count())
        image = re.search(r"st-key-pick_(\d+)", await pick.get_attribute("class")).group(1)
        await pick.locator("button").click()
        await page.get_by_text(re.compile(rf"^clean: test image {image}\b")).first.wait_for()
        await page.get_by_role("button", name="Attack", exact=True).click()
        await page.get_by_text(verdict_at(0.2)).first.wait_for()
        await idle(page)
        await check_page(page, "attack", session)
        slider = page.locator("[data-testid='stMain'] [data-testid='stSlider']").filter(
            has_text="alpha (band").locator("input[type=range]")
        alpha, presses = 0.2, session.number + 1
        for move in range(moves):
            alpha = round(alpha + 0.01 * presses, 2)
            await slider.focus()
            for _ in range(presses):
                await page.keyboard.press("ArrowRight")
            start = time.perf_counter()
            await page.get_by_text(verdict_at(alpha)).first.wait_for()
            session.latencies.append(time.perf_counter() - start)
            await idle(page)
            session.until_idle.append(time.perf_counter() - start)
            session.alphas.append(alpha)
            await look_for_leaks(page, f"move {move}", session, everyone, image)
            presses = sessions
        await page.get_by_role("link", name="Layers").click()
        await page.locator("h1", has_text="Layers").wait_for()
        await page.get_by_text(re.compile(rf"^alpha {alpha:g} here ")).first.wait_for()  # the histograms' caption
        await idle(page)
        await look_for_leaks(page, "layers", session, everyone, image)
        await check_page(page, "layers", session)
    except Exception as exc:
        session.errors.append(f"{exc.__class__.__name__}: {str(exc)[:300]}")
        await screenshot(context, f"student-{session.number}")
    finally:
        await context.close()


async def look_for_leaks(page, where: str, session: Session, everyone: list[Session], image: str | None) -> None:
    """Another session's alpha (or image) on this session's page is a leak."""
    text = await main_text(page)
    shown = {float(a) for a in re.findall(r"alpha (\d+\.\d+)", text)}
    others = {a for other in everyone if other is not session for a in other.alphas} - set(session.alphas)
    if shown & others:
        session.leaks.append(f"{where}: shows alpha {sorted(shown & others)}, not its own {session.alphas[-1]}")
    if image is not None and not re.search(rf"test image {image}\b", text):
        session.leaks.append(f"{where}: its image (test image {image}) is not shown")


async def class_run(url: str, server_pid: int, sessions: int, moves: int, heavy_jobs: int) -> dict:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        readies, done = [asyncio.Event() for _ in range(heavy_jobs)], asyncio.Event()
        heavy = [asyncio.create_task(heavy_session(browser, url, n, readies[n], done)) for n in range(heavy_jobs)]
        for ready in readies:
            await ready.wait()
        load_before = os.getloadavg()
        students = [Session(i) for i in range(sessions)]
        start = time.perf_counter()
        baseline, used = processor_seconds(server_pid), {}
        sampler = asyncio.create_task(sample_machine(server_pid, used))
        await asyncio.gather(*(student(browser, url, s, sessions, moves, students) for s in students))
        seconds = time.perf_counter() - start
        sampler.cancel()
        done.set()
        heavy_report = await asyncio.gather(*heavy)
        late = await late_session(browser, url) if heavy_jobs else None
        await browser.close()
    latencies = sorted(t for s in students for t in s.latencies)
    return {
        "sessions": sessions, "moves": moves, "heavy_jobs_started": heavy_jobs, "seconds": seconds,
        "slider_updates": len(latencies), **percentiles(latencies),
        "until_idle": percentiles(sorted(t for s in students for t in s.until_idle)),
        "errors": [f"session {s.number}: {e}" for s in students for e in s.errors],
        "leaks": [f"session {s.number}: {e}" for s in students for e in s.leaks],
        "heavy_jobs": heavy_report, "after_their_tabs_closed": late,
        "load_average_before": load_before, "load_average_max": max(LOADS, default=load_before[0]),
        "load_average_after": os.getloadavg(),
        "processor_seconds": {kind: round(sum(t - baseline.get(pid, (kind, 0.0))[1]
                                              for pid, (k, t) in used.items() if k == kind), 1)
                              for kind in ("server", "chromium")},
    }


def percentiles(seconds: list[float]) -> dict:
    """p50, p95 and max of sorted ``seconds`` (None when there are none)."""
    if not seconds:
        return {"p50_s": None, "p95_s": None, "max_s": None}
    return {"p50_s": statistics.median(seconds), "p95_s": seconds[round(0.95 * (len(seconds) - 1))],
            "max_s": seconds[-1]}


LOADS: list[float] = []  # the 1-minute load average every second while the students work


def processor_seconds(server_pid: int) -> dict[int, tuple[str, float]]:
    """Processor seconds so far of the server and of each Chromium process, by pid (Linux's /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            command = (stat.parent / "cmdline").read_bytes()
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        pid = int(stat.parent.name)
        kind = "server" if pid == server_pid else "chromium" if b"chrom" in command else None
        if kind:
            found[pid] = (kind, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return found


async def sample_machine(server_pid: int, used: dict) -> None:
    """Every second: the load average, and each process's processor seconds into ``used`` (the browsers
    share the server's cores here, where in a class each student's browser runs on their own machine)."""
    while True:
        LOADS.append(os.getloadavg()[0])
        used.update(processor_seconds(server_pid))
        await asyncio.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--moves", type=int, default=5)
    parser.add_argument("--heavy", type=int, default=2, help="heavy jobs (accuracy sweeps) running meanwhile")
    parser.add_argument("--model", choices=["digits", "cifar"], default="digits")
    parser.add_argument("--cifar-archive", type=Path, default=CIFAR_ARCHIVE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server, url = start_server(Path(folder), args.model, args.cifar_archive)
        try:
            results = asyncio.run(class_run(url, server.pid, args.sessions, args.moves, args.heavy))
        finally:
            server.terminate()
            server.wait(timeout=30)
            SHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(folder) / "server.log", SHOTS / "server.log")
    results["model"] = args.model
    save("b9_class_server", results)
    print(report(results))


def report(results: dict) -> str:
    """The figures in a few labelled lines, then every error and leak."""
    def seconds(figures: dict) -> str:
        if figures["p50_s"] is None:
            return "none measured (the errors say why)"
        return f"p50 {figures['p50_s']:.2f} s, p95 {figures['p95_s']:.2f} s, max {figures['max_s']:.2f} s"
    r = results
    lines = [
        f"B9: {r['sessions']} sessions x {r['moves']} slider moves ({r['model']} model), {r['heavy_jobs_started']} "
        f"heavy jobs meanwhile, {r['seconds']:.0f} s",
        f"slider-to-update latency ({r['slider_updates']} of {r['sessions'] * r['moves']} moves): {seconds(r)}",
        f"until the page run ended: {seconds(r['until_idle'])}",
        f"errors: {len(r['errors'])}",
        f"cross-session leaks: {len(r['leaks'])}",
        f"load average (1 min) before {r['load_average_before'][0]:.1f}, highest during "
        f"{r['load_average_max']:.1f}, after {r['load_average_after'][0]:.1f} (2 or more on 2 cores: busy)",
        f"processor seconds while the students worked: server {r['processor_seconds']['server']}, Chromium "
        f"{r['processor_seconds']['chromium']} (of {os.cpu_count() * r['seconds']:.0f} the machine had)",
    ]
    if r["heavy_jobs_started"]:
        lines.append(f"heavy jobs: {r['heavy_jobs']}; after their tabs closed: {r['after_their_tabs_closed']}")
    return "\n".join(lines + [f"  {line}" for line in r["errors"] + r["leaks"]])


if __name__ == "__main__":
    main()
