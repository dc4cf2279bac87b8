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
from .data import LazyImages
from .distributed import SOLO, Group
from .files import atomic_write, discard_damaged
from .operator import GradMode
from .outcomes import CLEAN, Outcomes
from .sparse_model import SparseModel

Progress = Callable[[float, int], None]  # (done, total); sweeps report fractions of an alpha
Images = torch.Tensor | LazyImages  # a batch of images, or the items of a dataset read as they are reached


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
    outcomes: Outcomes
    seconds: float
    settings: EvalSettings
    world_size: int = 1  # ranks that shared the work
    resumed_batches: int = 0  # attacked batches read back from a journal instead of attacked again

    @property
    def n(self) -> int:
        return self.outcomes.n

    @property
    def clean_acc(self) -> float:
        return self.outcomes.clean_acc

    @property
    def robust_acc(self) -> float:
        return self.outcomes.robust_acc

    def as_record(self, **context) -> dict:
        """A flat dict for JSON/CSV output: context (model, data) first, then settings and figures."""
        settings = asdict(self.settings)
        settings.pop("batch_size")
        return {**context, "n": self.n, **settings, "clean_acc": self.clean_acc,
                "robust_acc": self.robust_acc, "seconds": round(self.seconds, 3), "world_size": self.world_size}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """Predicted classes, batch by batch."""
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    return torch.cat([model(b).argmax(dim=1) for b in batches]) if batches else images.new_zeros(0, dtype=torch.long)


def _classifier(sparse: SparseModel | nn.Module, settings: EvalSettings) -> nn.Module:
    """The module to evaluate and attack: the sparsified model at alpha, or a plain model."""
    return sparse.at(settings.alpha, settings.grad) if isinstance(sparse, SparseModel) else sparse


def _clean_predictions(classifier: nn.Module, images: Images, batch_size: int, group: Group) -> torch.Tensor:
    """Predictions without attack, each rank predicting its share of a single process's batches."""
    share = group.shard(-(-len(images) // batch_size))
    own = predict(classifier, images[share.start * batch_size:share.stop * batch_size], batch_size)
    return torch.cat([p.to(images.device) for p in group.all_gather(own.cpu())])


def _attack_batch(attack, classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  batch_size: int) -> list[str]:
    """Each item's outcome after the attack: "" when it survives, else the attack that broke it."""
    adversarial = attack(images, labels)
    survived = (predict(classifier, adversarial, batch_size) == labels).tolist()
    breakers = getattr(attack, "broken_by", None) or [""] * len(survived)  # AutoAttack names its component
    return ["" if kept else breaker or attack.name for kept, breaker in zip(survived, breakers)]


def evaluate(model: SparseModel | nn.Module, images: Images, labels: torch.Tensor,
             settings: EvalSettings, progress: Progress | None = None, journal: "Journal | None" = None,
             group: Group = SOLO) -> EvalResult:
    """Clean and robust accuracy (fractions) on ``images`` for one setting, with per-item outcomes.

    With a ``journal``, every attacked batch is recorded as it finishes and batches recorded by an
    earlier, interrupted run are not attacked again. With a ``group`` of several ranks (torchrun),
    each rank attacks a contiguous share of the batches a single process would attack, and every
    rank returns the same, gathered result; with ``images`` a ``data.LazyImages``, each rank also
    reads only the items of its share.
    """
    start = time.perf_counter()
    classifier = _classifier(model, settings)
    size = settings.batch_size
    clean_pred = _clean_predictions(classifier, images, size, group)
    still_correct = (clean_pred == labels).nonzero().flatten()
    share = group.shard(-(-len(still_correct) // size))
    # Within the running batch too, at every pass through the model: a long attack shows it moves, and a
    # progress callback that raises (a cancelled job) stops it at once.
    within_batch = None if progress is None else (
        lambda passes, most: progress(first - offset + len(chunk) * passes / most, total))  # noqa: B023
    attack = make_attack(settings.attack, classifier, settings.eps, settings.steps, settings.targeted, settings.seed,
                         settings.step, within_batch)
    offset, total = share.start * size, min(share.stop * size, len(still_correct)) - share.start * size
    done: dict[int, list[str]] = {}
    resumed, earlier_seconds = 0, 0.0
    for first in range(share.start * size, share.stop * size, size):
        chunk = still_correct[first:first + size]
        recorded = journal.batches.get(first) if journal is not None else None
        if recorded is not None and len(recorded[0]) == len(chunk):
            done[first] = recorded[0]
            resumed, earlier_seconds = resumed + 1, earlier_seconds + recorded[1]
        else:
            batch_start = time.perf_counter()
            done[first] = _attack_batch(attack, classifier, images[chunk], labels[chunk], size)
            if journal is not None:
                journal.record(first, done[first], time.perf_counter() - batch_start)
        if progress is not None:
            progress(first + len(chunk) - offset, total)
    broken_by = [CLEAN if p != y else "" for p, y in zip(clean_pred.tolist(), labels.tolist())]
    positions = still_correct.tolist()
    shares = group.all_gather((done, resumed, earlier_seconds))
    for batches, _, _ in shares:
        for first, outcome in batches.items():
            for position, broken in zip(positions[first:first + size], outcome):
                broken_by[position] = broken
    outcomes = Outcomes(tuple(labels.tolist()), tuple(clean_pred.tolist()), tuple(broken_by))
    seconds = time.perf_counter() - start + sum(s for _, _, s in shares)
    return EvalResult(outcomes, seconds, settings, group.world_size, sum(r for _, r, _ in shares))


def sweep(model: SparseModel, images: Images, labels: torch.Tensor, settings: EvalSettings,
          alphas: Sequence[float], progress: Progress | None = None,
          cache: "ResultCache | None" = None, cache_key: dict | None = None, group: Group = SOLO) -> list[EvalResult]:
    """One evaluation per alpha on the same items and seed.

    ``progress(done, total)`` counts alphas, with fractions as each alpha's attacked batches finish,
    so that a long evaluation (AutoAttack runs for hours on a CPU) shows it is moving.
    """
    results = []
    for i, alpha in enumerate(alphas):
        one = replace(settings, alpha=float(alpha))
        report = None if progress is None else lambda done, total: progress(i + done / max(total, 1), len(alphas))  # noqa: B023 - used within this iteration
        run = lambda journal: evaluate(model, images, labels, one, report, journal, group)  # noqa: E731 - for the cache
        results.append(cache.get_or_run(cache_key or {}, one, run, group) if cache is not None else run(None))
        if progress is not None:
            progress(i + 1, len(alphas))
    return results


class Journal:
    """The attacked batches of one unfinished evaluation, on disk, so that an interrupted run resumes.

    Every attack seeds itself per call, so a batch attacked again gives the same result: resuming
    changes nothing but the time spent. ``batches`` maps a batch's first position among the
    attacked items to (each item's outcome, seconds spent). Rank r of a torchrun job writes its
    own file (``<name>.journal`` for rank 0, ``<name>.rank<r>.journal`` for the others) and reads
    them all, so that a job restarted with any number of ranks skips every batch already done.
    """

    def __init__(self, path: Path, rank: int = 0) -> None:
        self.path = path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
        self._pattern = f"{path.stem}*{path.suffix}"  # every rank's file
        stored = {file: self._read(file) for file in sorted(path.parent.glob(self._pattern))}
        self.batches: dict[int, tuple[list[str], float]] = {}
        for batches in stored.values():
            self.batches.update(batches)
        self._own = stored.get(self.path, {})  # each file is read once, this rank's own too

    @staticmethod
    def _read(path: Path) -> dict[int, tuple[list[str], float]]:
        try:
            stored = json.loads(path.read_text())
            batches = {int(first): (list(outcome), float(seconds)) for first, (outcome, seconds) in stored.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            discard_damaged(path, f"not a journal of attacked batches: {exc}")
            return {}
        if any(first < 0 or not all(isinstance(b, str) and b != CLEAN for b in outcome)
               or not 0 <= seconds < float("inf") for first, (outcome, seconds) in batches.items()):
            discard_damaged(path, "impossible figures")
            return {}
        return batches

    def record(self, first: int, outcome: list[str], seconds: float) -> None:
        self.batches[first] = self._own[first] = (outcome, seconds)
        text = json.dumps({str(k): list(v) for k, v in sorted(self._own.items())})
        atomic_write(self.path, lambda f: f.write(text.encode()))

    def remove(self) -> None:
        """Delete every rank's file of this journal (the evaluation is complete)."""
        for file in self.path.parent.glob(self._pattern):
            file.unlink(missing_ok=True)


class ResultCache:
    """Evaluation results on disk, one JSON file per (context, settings); written atomically.

    A result holds its per-item outcomes. An evaluation still running keeps a ``Journal`` next to
    its result file, so that a run stopped half-way (Ctrl-C, a closed laptop, a session's end, a
    killed rank) resumes where it stopped. Under torchrun rank 0 reads and writes the result.
    """

    FORMAT = 2  # part of the key: results stored before per-item outcomes are left alone, not read

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def _path(self, context: dict, settings: EvalSettings) -> Path:
        key = json.dumps({"context": context, "settings": asdict(settings), "format": self.FORMAT}, sort_keys=True)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def get_or_run(self, context: dict, settings: EvalSettings,
                   run: Callable[[Journal], EvalResult], group: Group = SOLO) -> EvalResult:
        """``context`` names the model, statistics and items (e.g. model key, stats hash, data, n, seed).

        ``run(journal)`` computes the result when none is stored. A stored file that is damaged or
        not a result is discarded with a ``CacheWarning`` and rerun.
        """
        path = self._path(context, settings)
        stored = self._lookup(path, settings) if group.is_main else None
        stored = group.broadcast(stored)
        if stored is not None:
            return stored
        journal = Journal(path.with_suffix(".journal"), group.rank)
        result = run(journal)
        if group.is_main:
            outcomes = result.outcomes
            record = {"clean_acc": result.clean_acc, "robust_acc": result.robust_acc, "n": result.n,
                      "seconds": result.seconds, "world_size": result.world_size, "labels": outcomes.labels,
                      "clean_pred": outcomes.clean_pred, "broken_by": outcomes.broken_by}
            atomic_write(path, lambda f: f.write(json.dumps(record).encode()))
            journal.remove()
        return result

    def _lookup(self, path: Path, settings: EvalSettings) -> EvalResult | None:
        try:
            return self._read(path, settings)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            discard_damaged(path, f"not a stored result: {exc}")
            return None

    @staticmethod
    def _read(path: Path, settings: EvalSettings) -> EvalResult:
        stored = json.loads(path.read_text())
        outcomes = Outcomes(tuple(map(int, stored["labels"])), tuple(map(int, stored["clean_pred"])),
                            tuple(map(str, stored["broken_by"])))
        if outcomes.n == 0 or (outcomes.clean_acc, outcomes.robust_acc) != (stored["clean_acc"], stored["robust_acc"]):
            raise ValueError(f"impossible figures {stored['clean_acc']}, {stored['robust_acc']}")
        seconds = float(stored["seconds"])
        return EvalResult(outcomes, seconds, settings, int(stored.get("world_size", 1)))
