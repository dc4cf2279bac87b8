"""An attack on one image as the user sets it up, and how it is described."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .operator import GradMode


@dataclass(frozen=True)
class AttackChoice:
    """An attack on one image as the user sets it up; ``target`` is the model the attacker sees."""

    attack: str = "pgd"
    eps: float = 8.0  # /255 for Linf attacks, the L2 norm for pgd-l2
    steps: int = 10
    target: Literal["base", "sparse"] = "sparse"
    grad: GradMode = "exact"
    targeted: bool = False
    seed: int = 0

    @property
    def effort(self) -> str:
        """How long the attack searches, in its own units: FGSM takes one step, Square counts queries,
        AutoAttack runs its fixed standard schedule (``steps`` is unused by both of these)."""
        if self.attack == "fgsm":
            return "one step"
        if self.attack == "autoattack":
            return "its standard schedule"
        if self.attack == "square":
            return f"{self.steps:,} {'query' if self.steps == 1 else 'queries'}"
        return f"{self.steps:,} {'step' if self.steps == 1 else 'steps'}"

    @property
    def description(self) -> str:
        """The attack in words, e.g. ``pgd eps 8/255, 10 steps``."""
        eps = f"{self.eps:g}" if self.attack == "pgd-l2" else f"{self.eps:g}/255"
        return f"{self.attack} eps {eps}, {self.effort}{', targeted' if self.targeted else ''}"

    def not_found(self) -> str:
        """What to say when the attack found no adversarial example (see ``found_adversarial``)."""
        return (f"No adversarial example found within {self.effort}: the attacked model still classifies the "
                "image correctly. Try more " + ("queries" if self.attack == "square" else "steps") + " or a larger eps.")


def opening_attack(eps: float) -> AttackChoice:
    """The attack a page starts with: PGD-10 against the base model, at the dataset's usual ``eps``."""
    return AttackChoice(attack="pgd", eps=eps, steps=10, target="base")


#: Square's queries by default on one image (its old default was 10, the other attacks' steps).
#: ``python benchmarks/lecture_measurements.py --cifar-n 10 --digits-n 50``, on images the base model
#: gets right: CIFAR-10 demo (eps 8/255, 10 images) Square fools 0 with 100 queries, 2 with 300 and
#: 2 with 1,000, as many as PGD-10; digits demo (eps 32/255, 50 images) 3, 5 and 6, PGD-10 6. The
#: CIFAR card's 2,000-image run has Square-1,000 fooling 36% of the correctly classified images.
SQUARE_DEFAULT_QUERIES = 1000


def default_steps(attack: str) -> int:
    """Steps (queries for Square) an attack on one image starts with."""
    return SQUARE_DEFAULT_QUERIES if attack == "square" else 10
