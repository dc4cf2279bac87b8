"""What the bundled demo models show a class: the perturbation across depth, and what Square needs.

For each demo model, on test images drawn with seed 0 (CIFAR-10 from ../shared/datasets when present):

* attenuation: PGD (the Layers page's default attack: the dataset's eps, 10 steps) crafted against the
  base model (transfer) and against MeanSparse itself (exact gradients, adaptive), probed at several
  alphas; per tap, the perturbation left without and with MeanSparse over the base model's clean
  features (``probes.Perturbation``), and the split into removed / passed / created;
* Square: the fraction of correctly classified images it fools within 100 ... 3,000 queries, next to PGD-10.

Prints one JSON line per measurement as it is made. Usage::

    python benchmarks/lecture_measurements.py --cifar-n 10 --digits-n 50 > lecture.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meansparse_core import attach  # noqa: E402
from meansparse_core.attacks import make_attack  # noqa: E402
from meansparse_core.data import DATASETS, extract, load_dataset, load_items, sample_indices  # noqa: E402
from meansparse_core.evaluation import predict  # noqa: E402
from meansparse_core.models import bundled_models, load_model  # noqa: E402
from meansparse_core.probes import probe  # noqa: E402
from meansparse_core.statistics_lookup import find_statistics  # noqa: E402

SHARED_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
ALPHAS = (0.25, 0.5, 1.0)
QUERIES = (100, 300, 1000)


def depth(sparse, images, adversarial, alpha) -> dict:
    """Per tap (forward order): relative sizes, and a summary over the taps."""
    probes = probe(sparse.wrapped, sparse.stats, images, adversarial, alpha)
    taps = [{"tap": p.name, "without": round(p.relative.base, 4), "with": round(p.relative.after, 4),
             "removed": round(p.relative.removed, 4), "passed": round(p.relative.passed, 4),
             "created": round(p.relative.created, 4), "replaced_clean": round(p.fraction_replaced_clean, 3)}
            for p in probes]
    return {"alpha": alpha, "taps_with_below_without": sum(t["with"] < t["without"] for t in taps),
            "taps": len(taps), "first": taps[0], "last": taps[-1], "per_tap": taps}


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def measure(name: str, data: str, root: str | None, n: int) -> None:
    spec = next(s for s in bundled_models() if s.name == name)
    model = load_model(spec).eval()
    sparse = attach(model, find_statistics(spec, model, data).stats)
    test = load_dataset(data, "test", root)
    images, labels = load_items(test, sample_indices(len(test), 4 * n, seed=0))
    correct = predict(model, images) == labels
    images, labels = images[correct][:n], labels[correct][:n]
    eps = DATASETS[data].linf_eps
    transfer = make_attack("pgd", model, eps, 10, seed=0)(images, labels)
    fooled = lambda adv: round((predict(model, adv) != labels).float().mean().item(), 3)  # noqa: E731
    emit(model=name, images=len(labels), eps=eps, what="pgd10 against the base model", fooled=fooled(transfer))
    for alpha in ALPHAS:
        emit(model=name, what="transfer", **depth(sparse, images, transfer, alpha))
    for alpha in ALPHAS:
        adaptive = make_attack("pgd", sparse.at(alpha), eps, 10, seed=0)(images, labels)
        emit(model=name, what="adaptive", **depth(sparse, images, adaptive, alpha))
    for queries in QUERIES:
        adversarial = make_attack("square", model, eps, queries, seed=0)(images, labels)
        emit(model=name, what="square against the base model", queries=queries, fooled=fooled(adversarial))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar-n", type=int, default=10)
    parser.add_argument("--digits-n", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    if SHARED_CIFAR.exists():
        with tempfile.TemporaryDirectory() as folder:
            measure("cifar-resnet9", "cifar10", str(extract(SHARED_CIFAR, Path(folder)) / "cifar10-jpeg"), args.cifar_n)
    measure("digits-cnn", "digits", None, args.digits_n)


if __name__ == "__main__":
    main()
