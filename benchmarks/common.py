"""What every benchmark shares: the machine's description, interleaved timing, the models, JSON output.

Timings are taken in interleaved rounds, each in a shuffled order, after one warm-up call per
variant, so that a noisy neighbour slows every variant alike; scripts report medians, and ratios
as the median of per-round ratios (each pair timed close together, so slow drifts cancel out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
# This checkout's library, not the one an editable install in the environment points at (another worktree).
sys.path.insert(0, str(ROOT))

from meansparse_core.models import bundled_statistics_path, build_random, find_model, load_model  # noqa: E402
from meansparse_core.statistics import Statistics, calibrate  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu": device, "date": time.strftime("%Y-%m-%d %H:%M")}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each variant in each of ``rounds`` interleaved rounds, after one warm-up each.

    The order within a round is shuffled (seeded): a variant that always ran after a heavy
    allocator, say, would otherwise pay for it in every round.
    """
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order, shuffler = list(variants), random.Random(0)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            run = variants[name]
            synchronize()
            start = time.perf_counter()
            run()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def ratio(times: dict[str, list[float]], variant: str, reference: str) -> float:
    """Median over rounds of variant / reference, each pair timed back to back: drift cancels out."""
    return statistics.median(a / b for a, b in zip(times[variant], times[reference]))


def demo_cifar(device: str = "cpu") -> tuple[nn.Module, Statistics]:
    """The CIFAR-10 demo model with its shipped statistics."""
    spec = find_model("bundled/cifar-resnet9")
    return load_model(spec).to(device), Statistics.load(bundled_statistics_path(spec))


def wrn_28_10(device: str = "cpu") -> tuple[nn.Module, Statistics]:
    """RobustBench's CIFAR-10 ``Standard`` WideResNet-28-10 with random weights, calibrated on 64 random images."""
    torch.manual_seed(0)
    model = build_random(find_model("robustbench/cifar10/Linf/Standard")).to(device).eval()
    return model, calibrate(model, torch.rand(64, 3, 32, 32, device=device).split(16))


MODELS: dict[str, Callable[[str], tuple[nn.Module, Statistics]]] = {
    "cifar-resnet9 (demo)": demo_cifar,
    "WRN-28-10 (random weights)": wrn_28_10,
}


def arguments(doc: str, rounds: int, pick_model: bool = False) -> argparse.ArgumentParser:
    """The options every benchmark shares: ``--rounds``, ``--device`` and, where it applies, ``--model``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--device", default="cpu")
    if pick_model:
        parser.add_argument("--model", default="cifar-resnet9 (demo)", choices=list(MODELS))
    return parser


def images(n: int, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """Random CIFAR-sized images: the costs measured here do not depend on the pictures."""
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(device)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return path
