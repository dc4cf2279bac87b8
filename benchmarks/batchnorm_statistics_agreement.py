"""Statistics read from BatchNorm layers against the exact statistics, on every bundled model.

For each bundled model with BatchNorm layers, two kinds of statistics: the exact ones shipped in
``meansparse_core/assets/`` (over all training images), and those ``calibrate --estimator batchnorm`` makes without
the training set (taps no BatchNorm feeds: the built-in photos). Prints

1. per tap, the error of the data-free mean and std relative to the exact sigma, |diff| / sigma,
   median and worst channel;
2. at the model card's alpha, with each kind of statistics on the same images (the first ``--n``
   test images sampled by seed 0, as ``evaluate --n`` takes them): clean accuracy, PGD-20 with exact
   gradients and with BPDA (straight-through), and, last for all models, AutoAttack (standard) on the
   first ``--autoattack-n`` of them.

Results are cached like the CLI's (a rerun resumes finished rows) and written row by row.
``--evaluations`` picks rows by name (``clean``, ``pgd``, ``bpda``, ``autoattack``) and ``--models`` the
models, so the long AutoAttack rows can run on their own.

    python benchmarks/batchnorm_statistics_agreement.py --data-dir <cifar10-jpeg> [--n 1000 --autoattack-n 200]
        [--evaluations autoattack] [--models bundled/digits-cnn,bundled/cifar-resnet9]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

from common import save  # noqa: F401 - puts this checkout's library first on the path
from meansparse_core.batchnorm_statistics import batchnorm_statistics, describe_sources
from meansparse_core.data import DATASETS, LazyImages, item_labels, load_dataset, sample_indices
from meansparse_core.evaluation import EvalResult, EvalSettings, ResultCache, evaluate
from meansparse_core.models import bundled_statistics_path, find_model, load_model
from meansparse_core.paths import cache_folder
from meansparse_core.photos import builtin_photos
from meansparse_core.sparse_model import attach
from meansparse_core.statistics import Statistics


@dataclass(frozen=True)
class Bundled:
    key: str
    alpha: float  # the alpha its model card evaluates


#: Rows by short name: (what the table calls it, attack, gradients).
EVALUATIONS = {"clean": ("clean", "fgsm", "exact"), "pgd": ("PGD-20, exact gradients", "pgd", "exact"),
               "bpda": ("PGD-20, BPDA", "pgd", "straight-through"),
               "autoattack": ("AutoAttack (standard)", "autoattack", "exact")}
MODELS = (Bundled("bundled/digits-cnn", 0.1), Bundled("bundled/cifar-resnet9", 0.5),
          Bundled("bundled/cifar-resnet9-w64", 0.4))


def tap_errors(estimate: Statistics, exact: Statistics) -> list[dict]:
    """Per tap: |mean difference| and |std difference| over the exact sigma, median and worst channel."""
    rows = []
    for guess, truth in zip(estimate.taps, exact.taps):
        sigma = truth.std.clamp_min(1e-12)
        mean_error, std_error = (guess.mean - truth.mean).abs() / sigma, (guess.std - truth.std).abs() / sigma
        rows.append({"tap": truth.tap.name, "source": guess.source,
                     "mean_median": float(mean_error.median()), "mean_worst": float(mean_error.max()),
                     "std_median": float(std_error.median()), "std_worst": float(std_error.max())})
    return rows


def kinds_of_statistics(bundled: Bundled) -> tuple[torch.nn.Module, dict[str, Statistics]]:
    spec = find_model(bundled.key)
    model = load_model(spec).eval()
    exact = Statistics.load(bundled_statistics_path(spec))
    free = batchnorm_statistics(model, spec.input_size, photos=builtin_photos(spec.input_size, spec.preparation),
                                photos_source="built-in photos")
    return model, {"exact": exact, "batchnorm": free}


def run(model, stats: Statistics, images, labels, settings: EvalSettings, key: dict) -> EvalResult:
    cache = ResultCache(cache_folder("results"))
    sparse = attach(model, stats)
    return cache.get_or_run({**key, "stats": stats.fingerprint(), "n": len(labels)}, settings,
                            lambda journal: evaluate(sparse, images, labels, settings, journal=journal))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--autoattack-n", type=int, default=200)
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder (python batches or ImageFolder tree)")
    parser.add_argument("--models", default=",".join(m.key for m in MODELS))
    parser.add_argument("--evaluations", default=",".join(EVALUATIONS), help="rows to run, of: " + ", ".join(EVALUATIONS))
    args = parser.parse_args()
    chosen = [m for m in MODELS if m.key in args.models.split(",")]
    report: dict = {"n": args.n, "autoattack_n": args.autoattack_n, "models": {}}
    print(f"load average (1 min) at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    loaded = {}
    for bundled in chosen:
        model, kinds = kinds_of_statistics(bundled)
        loaded[bundled.key] = model, kinds
        rows = tap_errors(kinds["batchnorm"], kinds["exact"])
        report["models"][bundled.key] = {"alpha": bundled.alpha, "taps": rows, "sources": describe_sources(kinds["batchnorm"]),
                                         "evaluations": []}
        print(f"\n{bundled.key}: {describe_sources(kinds['batchnorm'])}\n"
              "| tap | source | mean error, median | worst | std error, median | worst |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| `{r['tap']}` | {r['source']} | {r['mean_median']:.1%} | {r['mean_worst']:.1%} | "
                  f"{r['std_median']:.1%} | {r['std_worst']:.1%} |", flush=True)
    print("\n| model | alpha | evaluation | N | exact statistics | BatchNorm statistics | difference (points) | seconds |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    wanted = args.evaluations.split(",")
    plans = [[(name, attack, grad, args.autoattack_n if attack == "autoattack" else args.n)
              for short, (name, attack, grad) in EVALUATIONS.items() if short in wanted and (attack == "autoattack") == last]
             for last in (False, True)]  # AutoAttack last for all models: the others' rows come first
    for plan in plans:
        for bundled in chosen:
            model, kinds = loaded[bundled.key]
            spec = find_model(bundled.key)
            test = load_dataset(spec.dataset, "test", args.data_dir if spec.dataset != "digits" else None, fetch=False)
            eps = DATASETS[spec.dataset].linf_eps
            for name, attack, grad, n in plan:
                indices = sample_indices(len(test), min(n, len(test)), seed=0)
                images, labels = LazyImages(test, indices), item_labels(test, indices)
                settings = EvalSettings(alpha=bundled.alpha, attack=attack, eps=0.0 if name == "clean" else eps,
                                        steps=20, step=eps / 4 if attack == "pgd" else None, grad=grad, batch_size=100)
                key = {"benchmark": "batchnorm_statistics_agreement", "model": bundled.key}
                results = {kind: run(model, stats, images, labels, settings, key) for kind, stats in kinds.items()}
                figures = {kind: r.clean_acc if name == "clean" else r.robust_acc for kind, r in results.items()}
                seconds = sum(r.seconds for r in results.values())
                report["models"][bundled.key]["evaluations"].append({"evaluation": name, "n": len(labels), **figures,
                                                                     "seconds": seconds})
                print(f"| `{bundled.key}` | {bundled.alpha:g} | {name} | {len(labels)} | {figures['exact']:.1%} | "
                      f"{figures['batchnorm']:.1%} | {100 * (figures['batchnorm'] - figures['exact']):+.1f} | "
                      f"{seconds:.0f} |", flush=True)
                save("batchnorm_statistics_agreement", report)
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
