"""B4: evaluation that wastes no work.

1. Robust accuracy attacking only the items still classified correctly (the library's way) against
   attacking every item and then counting, on the same items: the results and the time saved.
   FGSM (no random start) shows the two give the very same number; PGD-10 gives the time saved
   (its random start is drawn per batch, so its figures may differ by a few items).
2. An alpha sweep against the sum of its single evaluations, and the same sweep again with the
   on-disk result cache.

Real labels matter here (the fraction of items skipped is the clean error), so it runs on CIFAR-10
test images when they are found (``--data-dir`` or ``MEANSPARSE_DATA``) and on the offline digits
otherwise.

    python benchmarks/b4_evaluation.py [--n 500] [--rounds 3] [--data-dir <folder>/cifar10-jpeg]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import torch

from common import interleaved, medians, ratio, save
from meansparse_core import attach
from meansparse_core.attacks import make_attack
from meansparse_core.data import DATASETS, DataUnavailable, load_dataset, load_items, sample_indices
from meansparse_core.evaluation import EvalSettings, ResultCache, evaluate, predict, sweep
from meansparse_core.models import bundled_statistics_path, find_model, load_model
from meansparse_core.statistics import Statistics


def setup(data_dir: str | None, n: int):
    try:
        key, test = "bundled/cifar-resnet9", load_dataset("cifar10", "test", data_dir, fetch=False)
    except DataUnavailable:
        key, test = "bundled/digits-cnn", load_dataset("digits", "test")
    spec = find_model(key)
    model = load_model(spec)
    images, labels = load_items(test, sample_indices(len(test), n, seed=0))
    return spec, attach(model, Statistics.load(bundled_statistics_path(spec))), images, labels


def attack_everything(model, images, labels, settings: EvalSettings) -> float:
    """Robust accuracy the wasteful way: attack every item, then count those right before and after."""
    attack = make_attack(settings.attack, model, settings.eps, settings.steps, seed=settings.seed)
    adversarial = torch.cat([attack(images[i:i + 100], labels[i:i + 100]) for i in range(0, len(images), 100)])
    right = (predict(model, images) == labels) & (predict(model, adversarial) == labels)
    return float(right.sum()) / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    spec, sparse, images, labels = setup(args.data_dir, args.n)
    eps = DATASETS[spec.dataset].linf_eps
    base = sparse.at(0.0)
    results: dict = {"model": spec.key, "n": args.n, "rounds": args.rounds}

    fgsm = EvalSettings(attack="fgsm", eps=eps)
    results["fgsm_same_result"] = {"only_correct": evaluate(base, images, labels, fgsm).robust_acc,
                                   "every_item": attack_everything(base, images, labels, fgsm)}
    pgd = EvalSettings(attack="pgd", eps=eps, steps=10)
    accuracies = {}
    times = interleaved({
        "only_correct": lambda: accuracies.__setitem__("only_correct", evaluate(base, images, labels, pgd).robust_acc),
        "every_item": lambda: accuracies.__setitem__("every_item", attack_everything(base, images, labels, pgd)),
    }, args.rounds)
    median = medians(times)
    clean = evaluate(base, images, labels, EvalSettings(attack="fgsm", eps=0)).clean_acc
    results["pgd10"] = {"median_seconds": median, "robust_acc": accuracies, "clean_acc": clean,
                        "time_saved": 1 - ratio(times, "only_correct", "every_item")}

    alphas = [0.0, 0.25, 0.5]
    n_sweep = min(args.n, 200)
    subset = images[:n_sweep], labels[:n_sweep]
    sweep_times = interleaved({
        "sweep": lambda: sweep(sparse, *subset, pgd, alphas),
        "single_evaluations": lambda: [evaluate(sparse, *subset, replace(pgd, alpha=a)) for a in alphas],
    }, args.rounds)
    timed = medians(sweep_times)
    with tempfile.TemporaryDirectory() as folder:
        cache = ResultCache(folder)
        sweep(sparse, *subset, pgd, alphas, cache=cache, cache_key={"model": spec.key})
        start = time.perf_counter()
        sweep(sparse, *subset, pgd, alphas, cache=cache, cache_key={"model": spec.key})
        cached = time.perf_counter() - start
    results["sweep"] = {"alphas": alphas, "n": n_sweep, "median_seconds": {**timed, "sweep_again_cached": cached},
                        "ratio": ratio(sweep_times, "sweep", "single_evaluations")}

    r = results
    print(f"{spec.key}, {args.n} test images (clean {clean:.1%})")
    print(f"FGSM robust accuracy: only still-correct items {r['fgsm_same_result']['only_correct']:.2%}, "
          f"every item {r['fgsm_same_result']['every_item']:.2%}")
    print(f"PGD-10: only still-correct {median['only_correct']:.2f} s ({accuracies['only_correct']:.2%}), "
          f"every item {median['every_item']:.2f} s ({accuracies['every_item']:.2%}): "
          f"{r['pgd10']['time_saved']:.0%} of the time saved")
    print(f"sweep of {alphas} on {n_sweep} items: {timed['sweep']:.2f} s, sum of single evaluations "
          f"{timed['single_evaluations']:.2f} s (ratio {r['sweep']['ratio']:.3f}); again from the cache {cached*1000:.1f} ms")
    save("b4_evaluation", results)


if __name__ == "__main__":
    main()
