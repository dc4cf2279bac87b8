"""One image attacked and compared: the adversarial version, whether it fools the model it attacked,
and the top-k predictions of the base and the sparsified model side by side.

Everything here takes the shared model read-only and gets alpha per call, so one loaded model
serves many users at once. Example::

    sparse = attach(model, stats)
    adversarial = attack_image(sparse, image, label, AttackChoice(attack="pgd", eps=8), alpha=0.2)
    comparison = compare(sparse, image, adversarial, label, alpha=0.2, class_names=spec.class_names)
    print(comparison.verdict)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from .attack_choice import AttackChoice
from .attacks import Progress, make_attack
from .evaluation import predict
from .operator import GradMode
from .sparse_model import SparseModel


def classifier(sparse: SparseModel, alpha: float, grad: GradMode = "exact",
               layer_alphas: Mapping[str, float] | None = None) -> nn.Module:
    """The model at ``alpha`` (the base model when alpha is 0 and no layer overrides it)."""
    if alpha == 0 and not any(layer_alphas.values() if layer_alphas else ()):
        return sparse.base
    return sparse.at(alpha, grad, layer_alphas)


def attack_image(sparse: SparseModel, image: torch.Tensor, label: int | None, choice: AttackChoice,
                 alpha: float = 0.0, layer_alphas: Mapping[str, float] | None = None,
                 progress: Progress | None = None) -> torch.Tensor:
    """The adversarial version of one (C, H, W) image, crafted against the base or the sparsified model.

    With no ``label`` (a photo whose class nobody named) the attack leads away from the base model's
    prediction on the clean image. ``progress`` hears of every pass through the model (``attacks.make_attack``).
    """
    target = (sparse.base if choice.target == "base"
              else classifier(sparse, alpha, choice.grad, layer_alphas))
    attack = make_attack(choice.attack, target, choice.eps, choice.steps, choice.targeted, choice.seed,
                         progress=progress)
    device = next(sparse.wrapped.parameters()).device
    if label is None:
        label = int(predict(sparse.base, image[None].to(device))[0])
    return attack(image[None].to(device), torch.tensor([label], device=device))[0].cpu()


def found_adversarial(sparse: SparseModel, image: torch.Tensor, adversarial: torch.Tensor, label: int | None,
                      choice: AttackChoice, alpha: float = 0.0,
                      layer_alphas: Mapping[str, float] | None = None) -> bool:
    """Whether ``adversarial`` (made by ``attack_image`` with these arguments) fools the model it attacked.

    Judged against ``label``, or, without one, against the base model's prediction on the clean image.
    An attack that fails returns the clean image (or one the model still gets right), which otherwise
    looks like a bug.
    """
    attacked = sparse.base if choice.target == "base" else classifier(sparse, alpha, layer_alphas=layer_alphas)
    device = next(sparse.wrapped.parameters()).device
    if label is None:
        label = int(predict(sparse.base, image[None].to(device))[0])
    return int(predict(attacked, adversarial[None].to(device))[0]) != label


@dataclass(frozen=True)
class Opening:
    """The image a page opens on (see ``opening_image``)."""

    index: int  # in the dataset
    fools_base: bool  # the default attack fools the base model on it


def opening_image(sparse: SparseModel, images: Sequence[tuple[int, torch.Tensor, int]],
                  choice: AttackChoice) -> Opening:
    """The first of ``images`` ((index, image, label) in gallery order) that the base model gets right and
    ``choice`` (against the base model) fools, so that the first attack a class sees finds something; the
    first image when the attack fools none.
    """
    if choice.target != "base":
        raise ValueError("The opening image is chosen for an attack on the base model.")
    device = next(sparse.wrapped.parameters()).device
    for index, image, label in images:
        if int(predict(sparse.base, image[None].to(device))[0]) != label:
            continue
        adversarial = attack_image(sparse, image, label, choice)
        if int(predict(sparse.base, adversarial[None].to(device))[0]) != label:
            return Opening(index, fools_base=True)
    return Opening(images[0][0], fools_base=False)


def amplified(perturbation: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The perturbation scaled to fill [0, 1] around mid-grey, and the factor used (1 if it is zero)."""
    peak = float(perturbation.abs().max())
    scale = 0.5 / peak if peak > 0 else 1.0
    return (0.5 + perturbation * scale).clamp(0, 1), scale


@dataclass(frozen=True)
class TopK:
    """The k most probable classes of one prediction, most probable first."""

    classes: tuple[str, ...]
    probabilities: tuple[float, ...]

    @property
    def best(self) -> str:
        return self.classes[0]


@torch.no_grad()
def top_k(model: nn.Module, image: torch.Tensor, class_names: Sequence[str], k: int = 5) -> TopK:
    """Top-k softmax probabilities of ``model`` for one (C, H, W) image."""
    device = next(model.parameters()).device
    logits = model(image[None].to(device)).float()
    if not torch.isfinite(logits).all():
        raise ValueError("The model's output for this image is NaN or infinite; check the image and the weights for "
                         "non-finite values.")
    probabilities = logits.softmax(dim=1)[0].cpu()
    values, indices = probabilities.topk(min(k, len(probabilities)))
    return TopK(tuple(class_names[i] for i in indices.tolist()), tuple(values.tolist()))


@dataclass(frozen=True)
class Comparison:
    """Base and sparsified predictions on the clean image and, when there is one, the adversarial one.

    ``label`` is the class the predictions are judged against: the true class, or, when nobody
    named it (``label_known`` False), the base model's prediction on the clean image.
    """

    label: str
    alpha: float
    base_clean: TopK
    sparse_clean: TopK
    base_adv: TopK | None
    sparse_adv: TopK | None
    label_known: bool = True

    @property
    def reference(self) -> str:
        """What ``label`` is, in words."""
        return "the true class" if self.label_known else "the base model's prediction"

    @property
    def verdict(self) -> str:
        """One sentence on what the attack did to each model."""
        if self.base_adv is None or self.sparse_adv is None:
            image = f"Clean image, true class {self.label}" if self.label_known else "Clean image, true class unknown"
            return (f"{image}: the base model says {self.base_clean.best}, "
                    f"MeanSparse at alpha {self.alpha:g} says {self.sparse_clean.best}. Run an attack to compare.")
        base_ok, sparse_ok = self.base_adv.best == self.label, self.sparse_adv.best == self.label
        outcome = {
            (True, True): f"both models still see {self.reference}",
            (False, True): f"the attack fools the base model ({self.base_adv.best}) but not MeanSparse",
            (True, False): f"the attack fools MeanSparse ({self.sparse_adv.best}) but not the base model",
            (False, False): (f"the attack fools both models (base: {self.base_adv.best}, "
                             f"MeanSparse: {self.sparse_adv.best})"),
        }[(base_ok, sparse_ok)]
        if self.label_known:
            return f"True class {self.label}, alpha {self.alpha:g}: {outcome}."
        return (f"True class unknown, so each model is judged against the base model's prediction on the clean "
                f"image ({self.label}); alpha {self.alpha:g}: {outcome}.")


@dataclass(frozen=True)
class BasePredictions:
    """The base model's top-k on a clean image and on its adversarial version (None without one): the
    same at every alpha, so a slider move need not predict them again."""

    clean: TopK
    adversarial: TopK | None


def base_predictions(sparse: SparseModel, clean: torch.Tensor, adversarial: torch.Tensor | None,
                     class_names: Sequence[str], k: int = 5) -> BasePredictions:
    return BasePredictions(top_k(sparse.base, clean, class_names, k),
                           top_k(sparse.base, adversarial, class_names, k) if adversarial is not None else None)


def compare(sparse: SparseModel, clean: torch.Tensor, adversarial: torch.Tensor | None, label: int | None,
            alpha: float, class_names: Sequence[str], layer_alphas: Mapping[str, float] | None = None,
            k: int = 5, base: BasePredictions | None = None) -> Comparison:
    """Top-k of the base and the sparsified model on a clean image and its adversarial version.

    ``label`` None (true class unknown) judges both against the base model's clean prediction. ``base``:
    the base model's predictions on these images, when already made.
    """
    sparsified = classifier(sparse, alpha, layer_alphas=layer_alphas)
    base = base or base_predictions(sparse, clean, adversarial, class_names, k)
    reference = base.clean.best if label is None else class_names[label]
    return Comparison(reference, alpha, base.clean, top_k(sparsified, clean, class_names, k), base.adversarial,
                      top_k(sparsified, adversarial, class_names, k) if adversarial is not None else None,
                      label_known=label is not None)