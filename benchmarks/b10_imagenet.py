"""B10: what one 224x224 photo costs on ImageNet architectures (random weights, no download).

For RobustBench's ``Salman2020Do_R18`` (ResNet-18) and ``Salman2020Do_R50`` (ResNet-50) built with
random weights and calibrated on 8 random images, medians over ``--rounds`` interleaved repeats of:

* ``forward``: one image through the base model, no gradients;
* ``gradient``: one forward and backward pass of one image through the base model, the unit of the
  app's estimate (``meansparse_core.budget``: PGD-10 costs 10 of them), timed in the same rounds so
  that ``pgd10 / (10 x gradient)`` says how far the estimate is off under the same load;
* ``pgd10``: PGD-10 on one image against MeanSparse at alpha 0.2 (exact gradients), as the Explore
  page's Attack button runs it;
* ``probes``: the Layers page's probes of every tap for one clean and one adversarial image;

the processor time of one more call of each of the first three (all threads together, see
``cpu_seconds``), plus the app's quick estimate of PGD-10 (``meansparse_core.budget.measure``, taken once, as the app
does), and the probes' peak memory: the rise of the process's peak resident set (VmHWM, reset
after handing freed memory back to the system) over what was resident before the call, and the
size of what the probes return.

    python benchmarks/b10_imagenet.py [--rounds 3] [--architectures ResNet-18]
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from common import arguments, interleaved, medians, ratio, save
from meansparse_core import attach
from meansparse_core.budget import measure
from meansparse_core.models import build_random, find_model, parameter_count
from meansparse_core.probes import probe
from meansparse_core.statistics import calibrate
from meansparse_core.attack_choice import AttackChoice
from meansparse_core.one_image import attack_image

ARCHITECTURES = {"ResNet-18": "robustbench/imagenet/Linf/Salman2020Do_R18",
                 "ResNet-50": "robustbench/imagenet/Linf/Salman2020Do_R50"}
SIZE = (3, 224, 224)
ALPHA = 0.2


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_rise_mb(run) -> tuple[float, object]:
    """How far the peak resident set rises above the current one while ``run()`` runs (Linux only)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system, so reuse cannot hide a rise
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _status_kb("VmRSS")
    result = run()
    return (_status_kb("VmHWM") - before) / 1024, result


def cpu_seconds(run) -> float:
    """Processor time of one call, all threads together: unlike wall time, hardly changed by other
    processes competing for the cores, so it estimates the wall time on an idle machine (divided by
    the threads that ran in parallel)."""
    start = time.process_time()
    run()
    return time.process_time() - start


def returned_mb(probes) -> float:
    arrays = [a for p in probes for s in (p.standardized, p.channel_values) for a in s.arrays()]
    return sum(np.asarray(a).nbytes for a in arrays) / 2**20


def one_architecture(key: str, rounds: int, device: str) -> dict:
    spec = find_model(key)
    torch.manual_seed(0)
    model = build_random(spec).to(device).eval()
    sparse = attach(model, calibrate(model, torch.rand(8, *SIZE, device=device).split(4)))
    image = torch.rand(SIZE, generator=torch.Generator().manual_seed(1))
    choice = AttackChoice("pgd", eps=4, steps=10, target="sparse")
    adversarial = attack_image(sparse, image, None, choice, ALPHA)
    clean, adv = image[None].to(device), adversarial[None].to(device)

    def forward() -> None:
        with torch.no_grad():
            model(clean)

    def gradient() -> None:
        x = clean.clone().requires_grad_(True)
        torch.autograd.grad(model(x).sum(), x)

    rise, probes = peak_rise_mb(lambda: probe(sparse.wrapped, sparse.stats, clean, adv, ALPHA))
    estimate = measure(model, SIZE)
    times = interleaved({
        "forward": forward,
        "gradient": gradient,
        "pgd10": lambda: attack_image(sparse, image, None, choice, ALPHA),
        "probes": lambda: probe(sparse.wrapped, sparse.stats, clean, adv, ALPHA),
    }, rounds)
    cpu = {name: cpu_seconds(run) for name, run in (("forward", forward), ("gradient", gradient),
                                                   ("pgd10", lambda: attack_image(sparse, image, None, choice, ALPHA)))}
    return {"model": key, "parameters": parameter_count(spec), "taps": len(sparse.taps),
            "seconds": medians(times), "cpu_seconds": cpu, "threads": torch.get_num_threads(), "pgd10_over_10_gradient_passes": ratio(times, "pgd10", "gradient") / 10,
            "pgd10_estimate_s": estimate.seconds("pgd", 10), "estimate": estimate.describe("pgd", 10),
            "probes_peak_rise_mb": rise, "probes_returned_mb": returned_mb(probes)}


def main() -> None:
    parser = arguments(__doc__, rounds=3)
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES), help="comma-separated, e.g. ResNet-18")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # other work on the machine slows every figure alike
    rows = {name: one_architecture(ARCHITECTURES[name], args.rounds, args.device)
            for name in args.architectures.split(",")}
    print(f"load average (1 min): {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs")
    for name, row in rows.items():
        s = row["seconds"]
        print(f"{name}: {row['parameters'] / 1e6:.1f}M parameters, {row['taps']} taps | forward {s['forward']:.3f} s, "
              f"PGD-10 {s['pgd10']:.2f} s = {row['pgd10_over_10_gradient_passes']:.2f} x 10 gradient passes "
              f"(app's estimate {row['pgd10_estimate_s']:.2f} s), probes {s['probes']:.3f} s, "
              f"probes' peak +{row['probes_peak_rise_mb']:.0f} MB, returned {row['probes_returned_mb']:.1f} MB | "
              f"CPU time (all {row['threads']} threads): forward {row['cpu_seconds']['forward']:.2f} s, "
              f"PGD-10 {row['cpu_seconds']['pgd10']:.1f} s")
    save("b10_imagenet", {"rounds": args.rounds, "alpha": ALPHA, "load_average": [load_before, os.getloadavg()[0]],
                          "architectures": rows})


if __name__ == "__main__":
    main()
