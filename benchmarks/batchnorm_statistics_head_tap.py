"""The digits model's PGD-20 (exact gradients) with BatchNorm statistics at its three BatchNorm taps and
the exact statistics at its head's tap (after a Linear layer: no BatchNorm, so the data-free estimate
takes that tap from the built-in photos). Splits the change ``batchnorm_statistics_agreement.py``
measures into the part the photos cause and the part the BatchNorm estimate causes.

    python benchmarks/batchnorm_statistics_head_tap.py
"""

from __future__ import annotations

from dataclasses import replace

from batchnorm_statistics_agreement import MODELS, kinds_of_statistics
from meansparse_core.data import DATASETS, LazyImages, item_labels, load_dataset, sample_indices
from meansparse_core.evaluation import EvalSettings, evaluate
from meansparse_core.sparse_model import attach


def main() -> None:
    digits = MODELS[0]
    model, kinds = kinds_of_statistics(digits)
    free, exact = kinds["batchnorm"], kinds["exact"]
    mixed = replace(free, taps=[f if f.source.startswith("BatchNorm ") else e for f, e in zip(free.taps, exact.taps)])
    test = load_dataset("digits", "test")
    indices = sample_indices(len(test), len(test), seed=0)
    eps = DATASETS["digits"].linf_eps
    result = evaluate(attach(model, mixed), LazyImages(test, indices), item_labels(test, indices),
                      EvalSettings(alpha=digits.alpha, attack="pgd", eps=eps, steps=20, step=eps / 4))
    print(f"{digits.key} at alpha {digits.alpha:g}, BatchNorm statistics where a BatchNorm feeds the tap, exact "
          f"elsewhere: clean {result.clean_acc:.1%}, PGD-20 (exact gradients) {result.robust_acc:.1%}, n={result.n}")


if __name__ == "__main__":
    main()
