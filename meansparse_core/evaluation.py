"""Clean and robust accuracy of a model with and without MeanSparse, and sweeps over alpha.

Robust accuracy attacks only the items the evaluated model still classifies correctly: a wrong
clean prediction already counts as a robust failure, so attacking it wastes time. Results are
cached on disk by everything that determines them. Example::

    result = evaluate(sparse, images, labels, EvalSettings(alpha=0.25, attack="pgd", eps=8, steps=10))
    table = sweep(sparse, images, labels, EvalSettings(attack="pgd"), alphas=[0, 0.1, 0.2])
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .attacks import make_attack
from .files import atomic_write, discard_damaged
from .operator import GradMode
from .placement import SparseModel

Progress = Callable[[float, int], None]  # (done, total); sweeps report fractions of an alpha


@dataclass(frozen=True)
class EvalSettings:
    """Everything besides the model and the items that decides an evaluation's result."""

    alpha: float = 0.0
    attack: str = "pgd"
    eps: float = 8.0  # /255 for Linf attacks
    steps: int = 10
    step: float | None = None  # PGD's step size in the units of eps; None: 2.5 * eps / steps
    grad: GradMode = "exact"  # gradients the attacker sees through MeanSparse
    targeted: bool = False
    seed: int = 0
    batch_size: int = 100


@dataclass(frozen=True)
class EvalResult:
    clean_acc: float
    robust_acc: float
    n: int
    seconds: float
    settings: EvalSettings

    def as_record(self, **context) -> dict:
        """A flat dict for JSON/CSV output: context (model, data) first, then settings and figures."""
        settings = asdict(self.settings)
        settings.pop("batch_size")
        return {**context, "n": self.n, **settings, "clean_acc": self.clean_acc,
                "robust_acc": self.robust_acc, "seconds": round(self.seconds, 3)}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """Predicted classes, batch by batch."""
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    return torch.cat([model(b).argmax(dim=1) for b in batches]) if batches else images.new_zeros(0, dtype=torch.long)


def _classifier(sparse: SparseModel | nn.Module, settings: EvalSettings) -> nn.Module:
    """The module to evaluate and attack: the sparsified model at alpha, or a plain model."""
    return sparse.at(settings.alpha, settings.grad) if isinstance(sparse, SparseModel) else sparse


def evaluate(model: SparseModel | nn.Module, images: torch.Tensor, labels: torch.Tensor,
             settings: EvalSettings, progress: Progress | None = None, journal: "Journal | None" = None) -> EvalResult:
    """Clean and robust accuracy (fractions) on ``images`` for one setting.

    With a ``journal``, every attacked batch is recorded as it finishes and batches recorded by an
    earlier, interrupted run are not attacked again.
    """
    start = time.perf_counter()
    classifier = _classifier(model, settings)
    correct = predict(classifier, images, settings.batch_size) == labels
    still_correct = correct.nonzero().flatten()
    attack = make_attack(settings.attack, classifier, settings.eps, settings.steps, settings.targeted, settings.seed,
                         settings.step)
    robust, earlier_seconds = 0, 0.0
    for first in range(0, len(still_correct), settings.batch_size):
        chunk = still_correct[first:first + settings.batch_size]
        recorded = journal.batches.get(first) if journal is not None else None
        if recorded is not None and recorded[0] <= len(chunk):
            robust += recorded[0]
            earlier_seconds += recorded[1]
        else:
            batch_start = time.perf_counter()
            adversarial = attack(images[chunk], labels[chunk])
            survived = int((predict(classifier, adversarial, settings.batch_size) == labels[chunk]).sum())
            robust += survived
            if journal is not None:
                journal.record(first, survived, time.perf_counter() - batch_start)
        if progress is not None:
            progress(first + len(chunk), len(still_correct))
    n = len(labels)
    seconds = time.perf_counter() - start + earlier_seconds
    return EvalResult(float(correct.sum()) / n, robust / n, n, seconds, settings)


def sweep(model: SparseModel, images: torch.Tensor, labels: torch.Tensor, settings: EvalSettings,
          alphas: Sequence[float], progress: Progress | None = None,
          cache: "ResultCache | None" = None, cache_key: dict | None = None) -> list[EvalResult]:
    """One evaluation per alpha on the same items and seed.

    ``progress(done, total)`` counts alphas, with fractions as each alpha's attacked batches finish,
    so that a long evaluation (AutoAttack runs for hours on a CPU) shows it is moving.
    """
    results = []
    for i, alpha in enumerate(alphas):
        one = replace(settings, alpha=float(alpha))
        report = None if progress is None else lambda done, total: progress(i + done / max(total, 1), len(alphas))  # noqa: B023 - used within this iteration
        run = lambda journal: evaluate(model, images, labels, one, report, journal)  # noqa: E731 - for the cache
        results.append(cache.get_or_run(cache_key or {}, one, run) if cache is not None else run(None))
        if progress is not None:
            progress(i + 1, len(alphas))
    return results


class Journal:
    """The attacked batches of one unfinished evaluation, on disk, so that an interrupted run resumes.

    Every attack seeds itself per call, so a batch attacked again gives the same result: resuming
    changes nothing but the time spent. ``batches`` maps a batch's first position among the
    attacked items to (images that survived, seconds spent).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.batches = self._read()

    def _read(self) -> dict[int, tuple[int, float]]:
        try:
            stored = json.loads(self.path.read_text())
            batches = {int(first): (int(survived), float(seconds)) for first, (survived, seconds) in stored.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            discard_damaged(self.path, f"not a journal of attacked batches: {exc}")
            return {}
        if any(first < 0 or survived < 0 or not 0 <= seconds < float("inf")
               for first, (survived, seconds) in batches.items()):
            discard_damaged(self.path, "impossible figures")
            return {}
        return batches

    def record(self, first: int, survived: int, seconds: float) -> None:
        self.batches[first] = (survived, seconds)
        text = json.dumps({str(k): list(v) for k, v in sorted(self.batches.items())})
        atomic_write(self.path, lambda f: f.write(text.encode()))


class ResultCache:
    """Evaluation results on disk, one JSON file per (context, settings); written atomically.

    An evaluation still running keeps a ``Journal`` next to its result file, so that a run stopped
    half-way (Ctrl-C, a closed laptop, a session's end) resumes where it stopped.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def _path(self, context: dict, settings: EvalSettings) -> Path:
        key = json.dumps({"context": context, "settings": asdict(settings)}, sort_keys=True)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def get_or_run(self, context: dict, settings: EvalSettings,
                   run: Callable[[Journal], EvalResult]) -> EvalResult:
        """``context`` names the model, statistics and items (e.g. model key, stats hash, data, n, seed).

        ``run(journal)`` computes the result when none is stored. A stored file that is damaged or
        not a result is discarded with a ``CacheWarning`` and rerun.
        """
        path = self._path(context, settings)
        try:
            return self._read(path, settings)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            discard_damaged(path, f"not a stored result: {exc}")
        journal = Journal(path.with_suffix(".journal"))
        result = run(journal)
        record = {"clean_acc": result.clean_acc, "robust_acc": result.robust_acc, "n": result.n, "seconds": result.seconds}
        atomic_write(path, lambda f: f.write(json.dumps(record).encode()))
        journal.path.unlink(missing_ok=True)
        return result

    @staticmethod
    def _read(path: Path, settings: EvalSettings) -> EvalResult:
        stored = json.loads(path.read_text())
        clean, robust, n = float(stored["clean_acc"]), float(stored["robust_acc"]), stored["n"]
        if not (isinstance(n, int) and n > 0 and 0 <= robust <= clean <= 1):
            raise ValueError(f"impossible figures {stored}")
        return EvalResult(clean, robust, n, float(stored["seconds"]), settings)
