"""The paper's protocol in one call: calibrate, select alpha on held-out training images, evaluate on test.

The authors selected alpha by sweeping it on test images with APGD-CE; that tunes the threshold on
the numbers it then reports. Here alpha is selected on a held-out slice of the *training* split,
disjoint from the calibration images, with APGD-CE through straight-through (BPDA) gradients so
that the choice rewards robustness rather than masked gradients, keeping the best robust accuracy
among the alphas that cost at most ``max_clean_drop`` of clean accuracy. The test split then gets
clean accuracy, AutoAttack (standard) on the base and the sparsified model, APGD-CE with BPDA and
Square on the sparsified model: the columns of RobustBench's entries for the published models.
Every evaluation goes through the result cache and its journal, so an interrupted run resumes.

The statistics come from either estimator (statistics.py). The exact one (the default) draws the
held-out slice and the calibration images from one shuffle of the training split. The authors'
estimator averages per-batch figures in the data's order, as their scripts did over the training set
in its stored order: then the held-out slice is the split's *last* images and calibration runs over
the others from the first one on, so that the statistics are the authors' own over all but the tail.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .accuracy_table import best_alpha, wilson_interval
from .distributed import SOLO, Group
from .evaluation import EvalResult, EvalSettings, ResultCache, evaluate, sweep
from .outcomes import Outcomes
from .sparse_model import SparseModel

@dataclass(frozen=True)
class Protocol:
    """The choices a reproduction makes besides the model and the data."""

    eps: float = 8.0  # /255
    alphas: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35)
    max_clean_drop: float = 0.01  # fraction of clean accuracy an alpha may cost on the held-out slice
    apgd_steps: int = 100  # APGD-CE with BPDA, for selection and on the test split
    square_queries: int = 5000
    seed: int = 0
    batch_size: int = 100


@dataclass(frozen=True)
class Selection:
    alpha: float
    sweep: list[EvalResult]  # alpha 0 first, then each candidate, on the held-out training slice


def select_alpha(sparse: SparseModel, images: torch.Tensor, labels: torch.Tensor, protocol: Protocol,
                 cache: ResultCache | None, cache_key: dict, group: Group = SOLO,
                 progress: Callable[[float, int], None] | None = None) -> Selection:
    """The alpha with the best BPDA robust accuracy among those within ``max_clean_drop`` of alpha 0's clean accuracy."""
    settings = EvalSettings(attack="apgd-ce", eps=protocol.eps, steps=protocol.apgd_steps, grad="straight-through",
                            seed=protocol.seed, batch_size=protocol.batch_size)
    results = sweep(sparse, images, labels, settings, [0.0, *protocol.alphas], progress, cache,
                    {**cache_key, "items": "held-out training slice"}, group)
    rows = [{"alpha": r.settings.alpha, "clean": r.clean_acc, "robust": r.robust_acc} for r in results]
    return Selection(best_alpha(rows, protocol.max_clean_drop), results)


def test_settings(protocol: Protocol, alpha: float) -> dict[str, EvalSettings]:
    """The evaluations on the test split, by row and column of the table."""
    base = EvalSettings(eps=protocol.eps, seed=protocol.seed, batch_size=protocol.batch_size)
    return {
        "base autoattack": replace(base, attack="autoattack"),
        "meansparse autoattack": replace(base, alpha=alpha, attack="autoattack"),
        "meansparse apgd-ce bpda": replace(base, alpha=alpha, attack="apgd-ce", steps=protocol.apgd_steps,
                                           grad="straight-through"),
        "meansparse square": replace(base, alpha=alpha, attack="square", steps=protocol.square_queries),
    }


def evaluate_test(sparse: SparseModel, images: torch.Tensor, labels: torch.Tensor, protocol: Protocol, alpha: float,
                  cache: ResultCache | None, cache_key: dict, group: Group = SOLO,
                  progress: Callable[[str], Callable[[float, int], None] | None] = lambda name: None,
                  ) -> dict[str, EvalResult]:
    """Each of ``test_settings`` on the test items, cached and resumable."""
    results = {}
    for name, settings in test_settings(protocol, alpha).items():
        run = lambda journal: evaluate(sparse, images, labels, settings, progress(name), journal, group)  # noqa: E731,B023
        results[name] = cache.get_or_run({**cache_key, "items": "test"}, settings, run, group) if cache else run(None)
    return results


def _cell(correct: float, n: int) -> str:
    low, high = wilson_interval(round(correct * n), n)
    return f"{correct:.2%} [{low:.1%}, {high:.1%}]"


def table(results: dict[str, EvalResult], alpha: float, protocol: Protocol) -> str:
    """A Markdown table in the shape of RobustBench's entries, with 95% Wilson intervals."""
    base, aa, bpda, square = (results[k] for k in test_settings(protocol, alpha))
    n = base.n
    rows = [
        "| Model | Clean | AutoAttack | APGD-CE + BPDA | Square |",
        "|---|---|---|---|---|",
        f"| base | {_cell(base.clean_acc, n)} | {_cell(base.robust_acc, n)} | — | — |",
        f"| MeanSparse, alpha {alpha:g} | {_cell(aa.clean_acc, n)} | {_cell(aa.robust_acc, n)} | "
        f"{_cell(bpda.robust_acc, n)} | {_cell(square.robust_acc, n)} |",
    ]
    return "\n".join(rows)


def report(model: str, results: dict[str, EvalResult], selection: Selection, protocol: Protocol,
           held_out: str, calibration: str, world_size: int) -> str:
    """The whole Markdown report: the table, how alpha was chosen, and what was run.

    ``held_out`` says which training images selected alpha, ``calibration`` which images and which
    estimator gave the statistics (e.g. "the first 49000 training images in stored order, the authors'
    estimator ...")."""
    n = next(iter(results.values())).n
    sweep_rows = "\n".join(f"| {r.settings.alpha:g} | {r.clean_acc:.2%} | {r.robust_acc:.2%} |" for r in selection.sweep)
    return f"""# MeanSparse reproduction: {model}

{table(results, selection.alpha, protocol)}

{n} test images, Linf eps {protocol.eps:g}/255; brackets: 95% Wilson intervals. AutoAttack: standard
version. APGD-CE + BPDA: {protocol.apgd_steps} steps through straight-through gradients. Square:
{protocol.square_queries} queries. Computed by {world_size} rank(s).

Statistics: {calibration}.

Alpha {selection.alpha:g} was selected on {held_out} (not used for the statistics) with
APGD-CE + BPDA, {protocol.apgd_steps} steps: the best robust accuracy among the alphas costing at
most {protocol.max_clean_drop:.1%} of clean accuracy. (The authors selected alpha on test images, which
tunes it on the figures reported.)

| alpha | clean (held-out) | APGD-CE + BPDA (held-out) |
|---|---|---|
{sweep_rows}
"""


def run_names(results: dict[str, EvalResult]) -> list[tuple[str, Outcomes]]:
    """(run name, outcomes) pairs for the per-item file."""
    return [(f"{name} alpha={r.settings.alpha:g}", r.outcomes) for name, r in results.items()]
