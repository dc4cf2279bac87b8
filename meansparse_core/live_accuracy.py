"""Accuracy that follows the slider: a fixed evaluation set with adversarial examples crafted once
against the base model, re-scored at each alpha with two forward passes."""

from __future__ import annotations

from dataclasses import dataclass
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
