"""Accuracy that follows the slider: a fixed evaluation set with adversarial examples crafted once
against the base model, re-scored at each alpha with two forward passes."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .attack_choice import AttackChoice
from .attacks import make_attack
from .evaluation import predict
from .one_image import classifier
from .sparse_model import SparseModel


@dataclass(frozen=True)
class Turns:
    """Items of the live set on which MeanSparse changes the verdict on the adversarial example, as
    positions in the live set; on each, the base model gets the clean image right."""

    rescued: tuple[int, ...]  # the attack fools the base model but not MeanSparse
    broken: tuple[int, ...]  # the attack fools MeanSparse but not the base model


@dataclass(frozen=True)
class LiveAccuracy:
    """A fixed evaluation set with adversarial examples crafted once against the base model.

    Re-scoring it at a new alpha costs two forward passes, so it can follow the slider. Its robust
    figure is *transfer* accuracy (the attacker never saw MeanSparse), which is not the adaptive
    robust accuracy of a sweep. ``indices`` are the items' indices in their dataset, ``choice`` the
    attack that made the adversarial examples.
    """

    images: torch.Tensor
    labels: torch.Tensor
    adversarial: torch.Tensor
    attack: str
    indices: tuple[int, ...] = ()
    choice: AttackChoice | None = None

    @classmethod
    def craft(cls, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, choice: AttackChoice,
              batch_size: int = 100, indices: Sequence[int] = ()) -> "LiveAccuracy":
        attack = make_attack(choice.attack, model, choice.eps, choice.steps, choice.targeted, choice.seed)
        adversarial = torch.cat([attack(images[i:i + batch_size], labels[i:i + batch_size])
                                 for i in range(0, len(labels), batch_size)])
        return cls(images, labels, adversarial, choice.description, tuple(indices), choice)

    def fingerprint(self) -> str:
        """A short hash of the images, labels and adversarial examples: equal sets score equally."""
        digest = hashlib.sha256(self.attack.encode())
        for tensor in (self.images, self.labels, self.adversarial):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def at(self, sparse: SparseModel, alpha: float,
           layer_alphas: Mapping[str, float] | None = None) -> tuple[float, float]:
        """(clean accuracy, transfer robust accuracy) of the model at ``alpha``."""
        model = classifier(sparse, alpha, layer_alphas=layer_alphas)
        both = predict(model, torch.cat([self.images, self.adversarial]))
        clean, adv = (both == torch.cat([self.labels, self.labels])).float().split(len(self.labels))
        return float(clean.mean()), float(adv.mean())

    def turns(self, sparse: SparseModel, alpha: float, layer_alphas: Mapping[str, float] | None = None) -> Turns:
        """The items MeanSparse at ``alpha`` rescues and those it breaks (see ``Turns``)."""
        base_clean, base_adv = (predict(sparse.base, torch.cat([self.images, self.adversarial])) ==
                                torch.cat([self.labels, self.labels])).split(len(self.labels))
        sparse_adv = predict(classifier(sparse, alpha, layer_alphas=layer_alphas), self.adversarial) == self.labels
        positions = lambda mask: tuple(torch.nonzero(mask).flatten().tolist())  # noqa: E731
        return Turns(rescued=positions(base_clean & ~base_adv & sparse_adv),
                     broken=positions(base_clean & base_adv & ~sparse_adv))


class LiveCurve:
    """The live figures of one live set and sparsified model at every alpha scored so far, for all who ask.

    A slider move to an alpha already scored costs nothing; ``fill`` scores a grid of alphas ahead of
    the slider (in a background thread), nearest the alpha asked for last first, so that a class moving
    its sliders soon finds every figure ready. Example::

        curve = LiveCurve(live, sparse)
        threading.Thread(target=curve.fill, args=([i / 100 for i in range(201)],), daemon=True).start()
        clean, transfer = curve.at(0.35)  # scored here unless the thread got there first
        curve.close()  # the thread stops after the alpha it is scoring

    Given a folder (``keep_in``), the figures outlive the process in a file named by everything they
    depend on (``key``): a restarted server starts from those scored before.
    """

    def __init__(self, live: LiveAccuracy, sparse: SparseModel, layer_alphas: Mapping[str, float] | None = None,
                 keep_in: Path | None = None) -> None:
        self.live, self.sparse, self.layer_alphas = live, sparse, dict(layer_alphas or {})
        self.store = keep_in / f"live-{self.key()}.json" if keep_in is not None else None
        self._figures: dict[float, tuple[float, float]] = _read(self.store)
        self._last_asked: float | None = None
        self._closed = False
        self._lock = threading.Lock()  # guards the dictionary only: scoring runs outside it

    def at(self, alpha: float) -> tuple[float, float]:
        """(clean accuracy, transfer robust accuracy) at ``alpha``, scored now if nobody has yet."""
        alpha = _grid_key(alpha)
        with self._lock:
            self._last_asked = alpha
            figures = self._figures.get(alpha)
        return figures if figures is not None else self._score(alpha)

    def scored(self) -> int:
        """How many alphas have figures."""
        with self._lock:
            return len(self._figures)

    def fill(self, alphas: Sequence[float]) -> None:
        """Score each of ``alphas`` not yet scored, the one nearest the last alpha asked for first, until
        all are scored or the curve is closed."""
        wanted = {_grid_key(a) for a in alphas}
        while not self._closed:
            with self._lock:
                todo = wanted - self._figures.keys()
                here = self._last_asked
            if not todo:
                break
            self._score(min(todo, key=lambda a: (abs(a - here), a) if here is not None else (a, a)))
        self.save()

    def key(self) -> str:
        """What the figures depend on: the live set, the statistics and the per-layer alphas."""
        parts = [self.live.fingerprint(), self.sparse.stats.fingerprint(), sorted(self.layer_alphas.items())]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def save(self) -> None:
        """Write the figures to ``store`` (whole or not at all: a reader never sees half a file)."""
        if self.store is None:
            return
        with self._lock:
            payload = json.dumps({repr(alpha): figures for alpha, figures in sorted(self._figures.items())})
        self.store.parent.mkdir(parents=True, exist_ok=True)
        partial = self.store.with_name(f"{self.store.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        partial.write_text(payload)
        os.replace(partial, self.store)

    def close(self) -> None:
        """Stop ``fill`` (after the alpha it is scoring, then it saves); ``at`` keeps working."""
        self._closed = True

    def _score(self, alpha: float) -> tuple[float, float]:
        figures = self.live.at(self.sparse, alpha, self.layer_alphas)
        with self._lock:
            return self._figures.setdefault(alpha, figures)


def _read(store: Path | None) -> dict[float, tuple[float, float]]:
    """The figures a store holds; none when there is no store, no file or an unreadable one."""
    try:
        return {float(alpha): (float(clean), float(transfer))
                for alpha, (clean, transfer) in json.loads(store.read_text()).items()} if store else {}
    except (OSError, ValueError, TypeError):
        return {}


def _grid_key(alpha: float) -> float:
    """Slider values computed two ways (0.1 * 3 and 0.3) are one threshold."""
    return round(float(alpha), 9)
