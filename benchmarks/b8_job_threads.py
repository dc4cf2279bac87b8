"""B8: what a slider move costs while two heavy jobs run, with and without the job queue (CPU, library level).

A slider move is what Explore recomputes for a new alpha (top-5 of both models on the clean and the
adversarial image, ``compare``), run in a thread started for it, as Streamlit starts one per rerun.
The heavy jobs are PGD attacks on a batch of test-sized images against MeanSparse, repeated until
the measurement ends. Three ways of running the two jobs:

* ``idle``: no heavy job;
* ``direct``: both in their own threads with torch's default thread count (the app before the queue);
* ``queued``: both submitted to ``JobQueue.for_this_machine()`` (on 2 cores: one at a time, one thread).

    python benchmarks/b8_job_threads.py [--rounds 30] [--model cifar-resnet9]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from common import save
from meansparse_core import attach
from meansparse_core.jobs import JobQueue
from meansparse_core.models import bundled_statistics_path, find_model, load_model
from meansparse_core.statistics import Statistics
from meansparse_core.attack_choice import AttackChoice
from meansparse_core.one_image import attack_image, compare
from meansparse_core.attacks import make_attack


def slider_moves(sparse, spec, rounds: int) -> list[float]:
    """Seconds of ``rounds`` slider moves, each in a new thread."""
    image = torch.rand(spec.input_size, generator=torch.Generator().manual_seed(0))
    adversarial = attack_image(sparse, image, 0, AttackChoice(steps=5, target="base"))
    times = []
    for alpha in torch.linspace(0.05, 1.0, rounds + 1).tolist():
        def move(alpha=alpha):
            start = time.perf_counter()
            compare(sparse, image, adversarial, 0, alpha, spec.class_names)
            times.append(time.perf_counter() - start)
        thread = threading.Thread(target=move)
        thread.start()
        thread.join()
    return times[1:]  # the first one warms up


def heavy_job(sparse, spec, stop: threading.Event) -> None:
    images = torch.rand(32, *spec.input_size, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(32, dtype=torch.long)
    attack = make_attack("pgd", sparse.at(0.2), 8, 20)
    while not stop.is_set():
        attack(images, labels)


def measure(mode: str, sparse, spec, rounds: int) -> dict:
    stop = threading.Event()
    queue = JobQueue.for_this_machine() if mode == "queued" else None
    if mode == "direct":
        threads = [threading.Thread(target=heavy_job, args=(sparse, spec, stop)) for _ in range(2)]
        for thread in threads:
            thread.start()
    elif mode == "queued":
        jobs = [queue.submit(lambda job: heavy_job(sparse, spec, stop), f"heavy {i}") for i in range(2)]
    time.sleep(1.0)  # let the jobs get going (a measurement, not synchronisation)
    times = slider_moves(sparse, spec, rounds)
    stop.set()
    if mode == "direct":
        for thread in threads:
            thread.join()
    elif mode == "queued":
        for job in jobs:
            job.wait()
        queue.close()
    return {"median": statistics.median(times), "p95": sorted(times)[int(0.95 * (len(times) - 1))],
            "max": max(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--model", default="cifar-resnet9", choices=["cifar-resnet9", "digits-cnn"])
    args = parser.parse_args()
    spec = find_model(f"bundled/{args.model}")
    model = load_model(spec)
    sparse = attach(model, Statistics.load(bundled_statistics_path(spec)))
    queue = JobQueue.for_this_machine()
    layout = {"workers": queue.workers, "threads_per_job": queue.threads_per_job}
    queue.close()
    results = {"model": spec.key, "rounds": args.rounds, "queue": layout,
               "modes": {mode: measure(mode, sparse, spec, args.rounds) for mode in ("idle", "direct", "queued")}}
    print(f"{spec.key}, queue {layout}: slider move (seconds)")
    for mode, t in results["modes"].items():
        print(f"  {mode:8} median {t['median']:.4f}  p95 {t['p95']:.4f}  max {t['max']:.4f}")
    save("b8_job_threads", results)


if __name__ == "__main__":
    main()
