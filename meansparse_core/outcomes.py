"""Per-item outcomes of an evaluation, and the per-item results file that researchers merge and audit.

Every accuracy the library reports is computed from these outcomes, never averaged from shards
or batches, so a result merged from many ranks or many runs weighs each item once.

The per-item file is CSV with a header row and one row per (run, item)::

    run,index,label,clean_pred,robust,broken_by,label_name,clean_pred_name
    alpha=0.25 apgd-ce bpda,4512,3,3,1,,cat,cat
    alpha=0.25 apgd-ce bpda,871,8,1,0,clean,ship,automobile
    alpha=0.25 apgd-ce bpda,90,6,6,0,apgd-ce,frog,frog

``run`` names the evaluation (model variant, alpha, attack, gradients); ``index`` is the item's
position in the dataset split (the test split for evaluations); ``label`` its true class;
``clean_pred`` the evaluated model's prediction without attack; ``robust`` 1 when the item is
still classified correctly after the attack; ``broken_by`` empty for a robust item, ``clean``
for an item misclassified without attack, else the attack that broke it (for AutoAttack, the
component: apgd-ce, apgd-t, fab-t or square); ``label_name`` and ``clean_pred_name`` the names of
the classes ``label`` and ``clean_pred`` (as the data source names them: "0" to "9" for digits).
Clean accuracy of a run is the mean of ``clean_pred == label``, robust accuracy the mean of
``robust``. Files written before the two name columns existed have the first six columns only and
are read the same way.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from typing import Sequence

from .files import atomic_write

COLUMNS = ["run", "index", "label", "clean_pred", "robust", "broken_by"]
NAME_COLUMNS = ["label_name", "clean_pred_name"]  # added after the first six, which stay as they were


CLEAN = "clean"  # broken_by of an item the model misclassifies before any attack


@dataclass(frozen=True)
class Outcomes:
    """What happened to each evaluated item, in item order: the source of every accuracy.

    ``broken_by[i]`` is "" for an item still classified correctly after the attack, ``"clean"``
    for one misclassified without attack, else the name of the attack that broke it.
    """

    labels: tuple[int, ...]
    clean_pred: tuple[int, ...]
    broken_by: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.labels) == len(self.clean_pred) == len(self.broken_by):
            raise ValueError("per-item outcomes of different lengths")
        for label, pred, broken in zip(self.labels, self.clean_pred, self.broken_by):
            if (broken == CLEAN) != (label != pred):
                raise ValueError("an item's clean prediction contradicts its outcome")

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def robust(self) -> tuple[bool, ...]:
        return tuple(b == "" for b in self.broken_by)

    @property
    def clean_acc(self) -> float:
        return sum(label == pred for label, pred in zip(self.labels, self.clean_pred)) / max(self.n, 1)

    @property
    def robust_acc(self) -> float:
        return sum(self.robust) / max(self.n, 1)


def write_items(path: str | os.PathLike, runs: Sequence[tuple[str, Outcomes]], indices: Sequence[int],
                class_names: Sequence[str]) -> None:
    """Write the per-item file for ``runs`` (name, outcomes) over the items at dataset ``indices``;
    ``class_names[c]`` names class ``c`` (e.g. ``DATASETS["cifar10"].class_names``)."""
    rows = [COLUMNS + NAME_COLUMNS]
    for name, outcomes in runs:
        if outcomes.n != len(indices):
            raise ValueError(f"run {name!r} has {outcomes.n} items, not {len(indices)}")
        if any(not 0 <= c < len(class_names) for c in (*outcomes.labels, *outcomes.clean_pred)):
            raise ValueError(f"run {name!r} has classes beyond the {len(class_names)} class names given")
        rows += [[name, index, label, pred, int(robust), broken, class_names[label], class_names[pred]]
                 for index, label, pred, robust, broken in zip(indices, outcomes.labels, outcomes.clean_pred,
                                                               outcomes.robust, outcomes.broken_by)]

    def write(f) -> None:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        f.write(text.getvalue().encode())

    atomic_write(path, write)


def read_items(path: str | os.PathLike) -> dict[str, tuple[list[int], Outcomes]]:
    """The per-item file as {run: (dataset indices, outcomes)}; ValueError for anything else."""
    runs: dict[str, tuple[list[int], list[int], list[int], list[str]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames not in (COLUMNS, COLUMNS + NAME_COLUMNS):
            raise ValueError(f"{path} is not a per-item results file (columns {reader.fieldnames}).")
        for line, row in enumerate(reader, start=2):
            if None in row or None in row.values():  # a field too many or too few
                raise ValueError(f"{path}, line {line}: not {len(reader.fieldnames)} fields; is the file cut short?")
            index, labels, preds, broken = runs.setdefault(row["run"], ([], [], [], []))
            try:
                index.append(int(row["index"]))
                labels.append(int(row["label"]))
                preds.append(int(row["clean_pred"]))
            except ValueError:
                raise ValueError(f"{path}, line {line}: index, label and clean_pred must be whole numbers.") from None
            broken.append(row["broken_by"])
            if (row["robust"] == "1") != (row["broken_by"] == ""):
                raise ValueError(f"{path}: item {row['index']} of {row['run']!r} is both robust and broken.")
    return {name: (index, Outcomes(tuple(labels), tuple(preds), tuple(broken)))
            for name, (index, labels, preds, broken) in runs.items()}
