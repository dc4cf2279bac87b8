"""How far the authors' statistics estimator is from the exact one, on the CIFAR-10 demo model.

Both estimators see the same N training images in the same order (a seeded mix of classes, and the
same images sorted by class), the authors' in batches of 512. Printed: the largest relative
difference of a standard deviation, the largest difference of a mean in units of the exact std,
and how many of M test images (a seeded sample) change prediction at alpha 0.25.

    python benchmarks/authors_estimator.py --data-dir ../shared/datasets/cifar10-jpeg [--n 5000] [--m 1000]
"""

from __future__ import annotations

import argparse

import torch

from meansparse_core import attach, calibrate
from meansparse_core.data import load_dataset, load_items, sample_indices
from meansparse_core.evaluation import predict
from meansparse_core.models import find_model, load_model


def compare(model, images, test_images) -> str:
    exact = calibrate(model, images.split(512))
    authors = calibrate(model, images.split(512), estimator="authors")
    std_gap = max(float(((a.std - e.std).abs() / e.std.clamp_min(1e-12)).max()) for a, e in zip(authors.taps, exact.taps))
    mean_gap = max(float(((a.mean - e.mean).abs() / e.std.clamp_min(1e-12)).max()) for a, e in zip(authors.taps, exact.taps))
    changed = int((predict(attach(model, exact).at(0.25), test_images)
                   != predict(attach(model, authors).at(0.25), test_images)).sum())
    return (f"std differs by at most {std_gap:.2%}, means by at most {mean_gap:.3f} std; "
            f"{changed} of {len(test_images)} predictions change at alpha 0.25")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--m", type=int, default=1000)
    args = parser.parse_args()
    model = load_model(find_model("bundled/cifar-resnet9"))
    train = load_dataset("cifar10", "train", args.data_dir, fetch=False)
    images, labels = load_items(train, sample_indices(len(train), args.n, seed=0))
    test = load_dataset("cifar10", "test", args.data_dir, fetch=False)
    test_images, _ = load_items(test, sample_indices(len(test), args.m, seed=1))
    with torch.no_grad():
        print(f"{args.n} mixed training images: {compare(model, images, test_images)}")
        print(f"the same, sorted by class: {compare(model, images[labels.argsort(stable=True)], test_images)}")


if __name__ == "__main__":
    main()
