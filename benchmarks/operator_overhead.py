"""B1: forward-pass overhead of MeanSparse, ours vs a straightforward baseline, measured side by side.

For each model: the base forward, the forward with our operator at alpha > 0, and the forward with
a baseline written from the paper's description (diff, abs, compare, torch.where against a
full-size tensor of means), each timed in interleaved rounds on the same batch; medians reported
as ratios over the base forward. Writes JSON next to the printed table.

    python benchmarks/operator_overhead.py [--batch 32] [--rounds 7] [--out benchmarks/results/b1.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from meansparse_core import attach, calibrate, route_taps
from meansparse_core.robustbench_compat import import_robustbench


def paper_baseline(stats, alpha):
    means = {t.tap.name: t.mean.float() for t in stats.taps}
    stds = {t.tap.name: t.std.float() for t in stats.taps}

    def handler(tap, x):
        shape = [1] * x.dim()
        shape[tap.channel_dim] = -1
        mean, crop = means[tap.name].view(shape), alpha * stds[tap.name].view(shape)
        return torch.where(torch.abs(x - mean) < crop, mean * torch.ones_like(x), x)

    return handler


def wrn_28_10():
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]["Standard"]["model"]()


MODELS = {"WRN-28-10 (RobustBench Standard, random weights)": wrn_28_10}


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(model, batch: int, rounds: int, alpha: float) -> dict:
    torch.manual_seed(0)
    model.eval()
    images = torch.rand(batch, 3, 32, 32)
    stats = calibrate(model, images.split(16))
    sparse = attach(model, stats)
    baseline = paper_baseline(stats, alpha)
    variants = {
        "base": lambda: model(images),
        "meansparse": lambda: sparse(images, alpha=alpha),
        "baseline": lambda: route_taps(model, stats.tap_list, baseline, images),
    }
    times = {k: [] for k in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(rounds):
            for key, fn in variants.items():
                times[key].append(time_once(fn))
    sparse.detach()
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "median_seconds": median,
        "overhead_meansparse": median["meansparse"] / median["base"] - 1,
        "overhead_baseline": median["baseline"] / median["base"] - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/b1_operator_overhead.json"))
    args = parser.parse_args()
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "batch": args.batch, "rounds": args.rounds, "alpha": args.alpha, "models": {},
    }
    print(f"{'model':52} {'base s':>8} {'ours':>8} {'baseline':>9}")
    for name, build in MODELS.items():
        r = measure(build(), args.batch, args.rounds, args.alpha)
        results["models"][name] = r
        print(f"{name:52} {r['median_seconds']['base']:8.3f} {r['overhead_meansparse']:+8.1%} {r['overhead_baseline']:+9.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
