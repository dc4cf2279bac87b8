"""B15: a class on one server, each student a protocol client (no browser): how many students it carries.

Starts ``streamlit run meansparse_app/app.py`` on a free port in a scratch folder (B9's server), then simulates
students with ``protocol_client.ProtocolClient``, which speaks Streamlit's websocket protocol as
the browser does, so that the load measured is the server's alone (in a class, each student's
browser runs on their own laptop). First ``--heavy`` sessions each start an accuracy sweep as large
as the Accuracy page allows (every test image, 200 PGD steps, BPDA, Square with 5,000 queries) and
keep their tab open, polling it as a browser does; then ``--students`` students at once, each:

1. opens the app and picks its own gallery image (student i the (i+2)-th, paging with "More images");
2. attacks it (the default PGD-10);
3. moves alpha ``--moves`` times at human pace: after each result, 1 to 2 s (jittered) before the next;
4. opens Layers.

Slider-to-result latency: from sending the rerun with the new alpha to the end of the run that drew
the verdict at that alpha ("True class 3, alpha 0.24: ..."). Errors: exception elements, error boxes,
failed or timed-out steps. Leaks: a run that shows a student an alpha it never chose, or another
test image than its own. Server: processor seconds and resident memory from ``/proc``; the machine's
load average before and after (other processes share the cores).

``--lecturer-first``: before the class, one session opens the app (the lecturer's, on the projector)
and the students start once the server has been idle for 5 s, its background work for that page done
(crafting the live set and scoring the live figures at every slider value); ``warm_up_s`` says how long
that took.

``--link N`` measures the lecturer's link instead: N students open one link that carries an
AutoAttack on one image; it reports when each saw the adversarial example and the server's work.

    python benchmarks/b15_protocol_load.py [--students 20] [--heavy 2] [--moves 10] [--model digits|cifar]
        [--lecturer-first] [--json]
    python benchmarks/b15_protocol_load.py --link 20 [--model cifar] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from b9_class_server import CIFAR_ARCHIVE, start_server
from common import save
from protocol_client import ProtocolClient, Run

STEP_TIMEOUT_S = 600
ATTACK_BUTTON = "FormSubmitter:attack-Attack"
SWEEP_BUTTON = "FormSubmitter:sweep-Run"
JOB_STATE = re.compile(r"queued, position \d+|evaluation \d+ of")
SHOWN_ALPHA = re.compile(r"alpha (\d+\.\d+)")
SHOWN_IMAGE = re.compile(r"test image (\d+)\b")
LINKED = {"digits": ("bundled/digits-cnn", "digits", 32), "cifar": ("bundled/cifar-resnet9", "cifar10", 8)}  # model, data, eps


def verdict_at(alpha: float) -> re.Pattern:
    """The verdict above the predictions after an attack, at ``alpha``."""
    return re.compile(rf"^True class .*, alpha {alpha:g}: ")


def shows(run: Run, pattern: re.Pattern) -> bool:
    return any(pattern.search(text) for text in run.texts)


@dataclass
class Student:
    """What one simulated student did and saw."""

    number: int
    images: set[str] = field(default_factory=set)  # the one shown when it opened the app, and its pick
    alphas: list[float] = field(default_factory=lambda: [0.2])  # every alpha it chose (0.2: the default)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    interrupted: int = 0  # its runs that a newer request (or ``st.rerun``) cut short

    def check(self, run: Run, where: str) -> None:
        """Errors on the page, and what only another session could have put there."""
        self.errors += [f"{where}: {text[:200]}" for text in run.exceptions]
        foreign = {float(a) for t in run.texts for a in SHOWN_ALPHA.findall(t)} - set(self.alphas)
        if foreign:
            self.leaks.append(f"{where}: shows alpha {sorted(foreign)}; it chose {self.alphas}")
        foreign = {i for t in run.texts for i in SHOWN_IMAGE.findall(t)} - self.images
        if foreign:
            self.leaks.append(f"{where}: shows test image {sorted(foreign)}; it had {sorted(self.images)}")


def alpha_for(student: int, move: int, students: int) -> float:
    """Each student's alphas differ from everyone else's as long as there are enough slider steps."""
    return round(0.21 + ((student + students * move) % 179) * 0.01, 2)


async def pick_own_image(client: ProtocolClient, run: Run, student: Student) -> Run:
    """The gallery's (number + 2)-th image: the first is already picked when the page opens."""
    page, position = divmod(student.number + 1, 8)
    for _ in range(page):
        run = await client.click("gallery_more")
    picks = [w.key for w in run.widgets if w.key and w.key.startswith("pick_")]
    student.images.add(picks[position].removeprefix("pick_"))
    run = await client.click(picks[position])
    student.check(run, "pick")
    return run


async def student_session(url: str, student: Student, students: int, moves: int, rng: random.Random) -> None:
    client = await ProtocolClient.connect(url)
    try:
        run = await client.rerun()
        student.images |= {i for t in run.texts if t.startswith("clean: ") for i in SHOWN_IMAGE.findall(t)}
        student.check(run, "open")
        await pick_own_image(client, run, student)
        run = await client.click(ATTACK_BUTTON)
        if not shows(run, verdict_at(0.2)):
            student.errors.append(f"attack: no verdict at alpha 0.2 after the attack: {run.texts[-12:]}")
        student.check(run, "attack")
        for move in range(moves):
            await asyncio.sleep(rng.uniform(1.0, 2.0))  # a human looks, then moves again
            alpha = alpha_for(student.number, move, students)
            student.alphas.append(alpha)
            start = time.perf_counter()
            await client.set_value("alpha", alpha, wait=False)
            run = await client.run_until(lambda r: shows(r, verdict_at(alpha)), STEP_TIMEOUT_S)
            student.latencies.append(run.ended_at - start)
            student.check(run, f"move {move}")
        run = await client.open_page("Layers")
        if not shows(run, re.compile(rf"^alpha {student.alphas[-1]:g} here ")):
            student.errors.append(f"layers: no histograms at alpha {student.alphas[-1]:g}")
        student.check(run, "layers")
    except Exception as exc:  # reported, not raised: the others' figures still count
        student.errors.append(f"{exc.__class__.__name__}: {str(exc)[:300]}")
    finally:
        student.interrupted = client.interrupted
        await client.close()


async def heavy_session(url: str, number: int, started: asyncio.Event, done: asyncio.Event) -> dict:
    """An accuracy sweep as large as the page allows, its tab kept open (polled) until ``done``."""
    client = await ProtocolClient.connect(url)
    try:
        await client.rerun()
        await client.open_page("Accuracy")
        client.fill("Test images (N)", client.find("Test images (N)").maximum)
        client.fill("Steps", 200)
        client.fill("Also with Square (no gradients)", True)
        client.fill("Square queries", 5000)
        await client.click(SWEEP_BUTTON, wait=False)
        run = await client.run_until(lambda r: shows(r, JOB_STATE), STEP_TIMEOUT_S)
        first = next(t for t in run.texts if JOB_STATE.search(t))
        started.set()
        await done.wait()
        return {"session": number, "when_started": first, "errors": run.exceptions}
    except Exception as exc:
        started.set()
        return {"session": number, "error": f"{exc.__class__.__name__}: {str(exc)[:300]}"}
    finally:
        await client.close()


class ServerWatch:
    """The server's processor seconds and resident memory, from ``/proc``, sampled every second."""

    def __init__(self, pid: int) -> None:
        self.pid, self.rss_mb, self.threads = pid, [], []
        self.start_cpu, self.start_time = self.cpu_seconds(), time.perf_counter()

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def sample(self) -> None:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
        self.rss_mb.append(int(status["VmRSS"].split()[0]) / 1024)
        self.threads.append(int(status["Threads"]))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(1)

    def report(self) -> dict:
        self.sample()
        return {"server_processor_s": round(self.cpu_seconds() - self.start_cpu, 1),
                "wall_s": round(time.perf_counter() - self.start_time, 1),
                "server_rss_mb_start": round(self.rss_mb[0]), "server_rss_mb_peak": round(max(self.rss_mb)),
                "server_rss_mb_end": round(self.rss_mb[-1]), "server_threads_max": max(self.threads)}


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50_s": None, "p95_s": None, "max_s": None}
    seconds = sorted(seconds)
    return {"p50_s": round(statistics.median(seconds), 3), "p95_s": round(seconds[round(0.95 * (len(seconds) - 1))], 3),
            "max_s": round(seconds[-1], 3)}


async def lecturer_opens_the_app(url: str, server_pid: int, quiet_s: int = 5, limit_s: float = 900) -> float:
    """The lecturer's session opens the app; the seconds until the server had been idle for ``quiet_s``."""
    start = time.perf_counter()
    client = await ProtocolClient.connect(url)
    try:
        await client.rerun()
    finally:
        await client.close()
    watch, still = ServerWatch(server_pid), 0
    busy = watch.cpu_seconds()
    while still < quiet_s and time.perf_counter() - start < limit_s:
        await asyncio.sleep(1)
        now = watch.cpu_seconds()
        still, busy = (still + 1 if now - busy < 0.05 else 0), now
    return round(time.perf_counter() - start - quiet_s, 1)


async def class_run(url: str, server_pid: int, students: int, moves: int, heavy: int, seed: int,
                    lecturer_first: bool) -> dict:
    warm_up = await lecturer_opens_the_app(url, server_pid) if lecturer_first else None
    started, done = [asyncio.Event() for _ in range(heavy)], asyncio.Event()
    sweeps = [asyncio.create_task(heavy_session(url, n, started[n], done)) for n in range(heavy)]
    for event in started:
        await event.wait()
    load_before = os.getloadavg()
    watch = ServerWatch(server_pid)
    sampler = asyncio.create_task(watch.run())
    everyone = [Student(i) for i in range(students)]
    rng = random.Random(seed)
    await asyncio.gather(*(student_session(url, s, students, moves, random.Random(rng.random())) for s in everyone))
    sampler.cancel()
    server = watch.report()
    done.set()
    heavy_report = await asyncio.gather(*sweeps)
    latencies = [t for s in everyone for t in s.latencies]
    return {
        "students": students, "moves": moves, "heavy_jobs": heavy, "warm_up_s": warm_up,
        "slider_moves_measured": len(latencies),
        **percentiles(latencies),
        "errors": len([e for s in everyone for e in s.errors]) + sum("error" in h for h in heavy_report),
        "leaks": len([e for s in everyone for e in s.leaks]),
        "interrupted_runs": sum(s.interrupted for s in everyone),
        "error_list": [f"student {s.number}: {e}" for s in everyone for e in s.errors],
        "leak_list": [f"student {s.number}: {e}" for s in everyone for e in s.leaks],
        "sweeps": heavy_report, **server,
        "load_generator_processor_s": round(time.process_time(), 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


async def link_run(url: str, server_pid: int, students: int, query: str) -> dict:
    """``students`` open one link carrying an attack at once; when did each see the adversarial example?"""
    load_before = os.getloadavg()
    watch = ServerWatch(server_pid)
    sampler = asyncio.create_task(watch.run())
    start = time.perf_counter()
    seen, positions, errors = [], [], []

    async def open_link() -> None:
        client = await ProtocolClient.connect(url, query)
        try:
            await client.send_rerun()
            while True:
                run = await client.next_run(STEP_TIMEOUT_S)
                errors.extend(run.exceptions)
                positions.extend(int(p) for t in run.texts for p in re.findall(r"queued, position (\d+)", t))
                if shows(run, re.compile(r"^Adversarial example: ")):
                    seen.append(time.perf_counter() - start)
                    return
        except Exception as exc:
            errors.append(f"{exc.__class__.__name__}: {str(exc)[:300]}")
        finally:
            await client.close()

    await asyncio.gather(*(open_link() for _ in range(students)))
    sampler.cancel()
    return {"students": students, "link": query, "saw_the_result": len(seen), **percentiles(seen),
            "highest_queue_position_seen": max(positions, default=None), "errors": len(errors),
            "error_list": errors, "leaks": 0, **watch.report(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=20)
    parser.add_argument("--heavy", type=int, default=2, help="accuracy sweeps running meanwhile")
    parser.add_argument("--moves", type=int, default=10)
    parser.add_argument("--model", choices=["digits", "cifar"], default="digits")
    parser.add_argument("--cifar-archive", type=Path, default=CIFAR_ARCHIVE)
    parser.add_argument("--link", type=int, default=0, metavar="N",
                        help="instead: N students open one link carrying an AutoAttack")
    parser.add_argument("--lecturer-first", action="store_true",
                        help="one session opens the app first; the class starts when the server is idle")
    parser.add_argument("--seed", type=int, default=0, help="seeds the students' pauses")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server, url = start_server(Path(folder), args.model, args.cifar_archive)
        try:
            if args.link:
                model, data, eps = LINKED[args.model]
                query = (f"page=explore&model={model}&data={data}&image=3&alpha=0.25&attack=autoattack&eps={eps}"
                         "&seed=0&target=base")
                results = asyncio.run(link_run(url, server.pid, args.link, query))
            else:
                results = asyncio.run(class_run(url, server.pid, args.students, args.moves, args.heavy, args.seed,
                                                args.lecturer_first))
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:  # a loaded machine: the figures still count
                server.kill()
    results["model"] = args.model
    name = (f"b15_{'link' if args.link else 'class'}_{args.model}_{args.link or args.students}_{args.heavy}"
            + ("_lecturer_first" if args.lecturer_first else ""))
    with contextlib.redirect_stdout(sys.stderr):
        save(name, results)
    print(json.dumps(results) if args.json else report(results))


def report(r: dict) -> str:
    lines = [f"B15 ({r['model']} model): " + (f"{r['students']} students open one link with an AutoAttack"
                                              if "link" in r else
                                              f"{r['students']} students x {r['moves']} slider moves, "
                                              f"{r['heavy_jobs']} sweeps meanwhile")]
    if r.get("warm_up_s") is not None:
        lines.append(f"the lecturer's session opened the app first; the server was idle after {r['warm_up_s']} s")
    if "link" in r:
        lines.append(f"saw the adversarial example: {r['saw_the_result']} of {r['students']}, after p50 "
                     f"{r['p50_s']} s, max {r['max_s']} s; highest queue position shown {r['highest_queue_position_seen']}")
    else:
        lines.append(f"slider-to-result ({r['slider_moves_measured']} moves): p50 {r['p50_s']} s, "
                     f"p95 {r['p95_s']} s, max {r['max_s']} s")
    lines += [f"errors {r['errors']}, leaks {r['leaks']}",
              f"server: {r['server_processor_s']} processor-s in {r['wall_s']} s, memory {r['server_rss_mb_start']} -> "
              f"peak {r['server_rss_mb_peak']} MB, {r['server_threads_max']} threads at most",
              f"load average before {r['load_average_before']}, after {r['load_average_after']}"]
    return "\n".join(lines + [f"  {e}" for e in r["error_list"] + r.get("leak_list", [])])


if __name__ == "__main__":
    main()
