"""Adversarial attacks behind one small interface: ``attack(images, labels) -> adversarial images``.

Inputs and outputs are images in [0, 1]. ``eps`` is in user units: /255 for Linf (``eps=8`` means
8/255), plain L2 norm for L2. FGSM and PGD are implemented here; APGD, Square and AutoAttack are
the reference implementations by Croce and Hein (``pyautoattack``, installed with robustbench).

Attack a sparsified model with exact or straight-through (BPDA) gradients by passing
``sparse.at(alpha, grad=...)`` as the model. Attacks never change the model's weights, mode or
``requires_grad``: they differentiate with respect to the input only. Example::

    attack = make_attack("pgd", model, eps=8, steps=10, seed=0)
    adversarial = attack(images, labels)

``progress(done, total)`` is told before every pass through the model how many passes it made
(``total`` is the most the attack makes, ``Attack.passes``; ``done`` stays below it: an attack is
not over until it returns). It is the one place that sees inside pyautoattack's loops, so a caller
can follow any attack, and stop it by raising from ``progress`` (``jobs.Job.report`` does when a job
is cancelled).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .model_modes import eval_mode, frozen

Progress = Callable[[int, int], None]  # (model passes so far, the most the attack makes)


class _Reporting(nn.Module):
    """The attacked model, telling ``progress`` of each pass before making it."""

    def __init__(self, model: nn.Module, progress: Progress, most: int) -> None:
        super().__init__()
        self.model, self.progress, self.most, self.passes = model, progress, most, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.progress(min(self.passes, self.most - 1), self.most)
        self.passes += 1
        return self.model(x)


class Attack:
    """Base class. Subclasses implement ``_perturb(images, labels, targets)``.

    Args:
        model: maps (N, C, H, W) images in [0, 1] to logits (N, K).
        eps: budget in user units (Linf: /255; L2: norm).
        steps: iterations (queries for Square).
        targeted: push each image towards a random other class (seeded) instead of away from its label.
        seed: makes random starts, targets and Square's search repeatable.
        progress: told of every pass through the model (see the module's docstring).
    """

    name = "attack"
    norm = "Linf"
    gradient_free = False

    def __init__(self, model: nn.Module, eps: float, steps: int = 10, targeted: bool = False, seed: int = 0,
                 progress: Progress | None = None) -> None:
        if eps < 0 or steps < 1:
            raise ValueError(f"{self.name} needs eps >= 0 and steps >= 1 (got eps={eps}, steps={steps}).")
        self.model = model if progress is None else _Reporting(model, progress, sum(self.passes(steps)))
        self.eps_user = eps
        self.eps = eps / 255 if self.norm == "Linf" else float(eps)
        self.steps = int(steps)
        self.targeted = targeted
        self.seed = seed

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial images for ``images`` with true ``labels``, the model in eval mode, its weights frozen."""
        with eval_mode(self.model), frozen(self.model):
            return self.run(images, labels)

    def run(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The attack with the model in whatever mode it is in (adversarial training uses train mode)."""
        if len(images) == 0 or self.eps == 0:
            return images.clone()
        # Standard (N, C, H, W) strides: images made from HWC arrays by ``permute`` have channels-last
        # strides, and pyautoattack ``.view``s gradients laid out like its input, which fails on those.
        images = images.detach().contiguous()
        if isinstance(self.model, _Reporting):
            self.model.passes = 0
        targets = self._random_targets(images, labels) if self.targeted else None
        return self._perturb(images, labels, targets).detach().clamp(0, 1)

    def _random_targets(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A uniformly random class different from each label, fixed by the seed."""
        with torch.no_grad():
            num_classes = self.model(images[:1]).shape[1]
        generator = torch.Generator().manual_seed(self.seed)
        shift = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
        return (labels + shift) % num_classes

    @classmethod
    def passes(cls, steps: int) -> tuple[int, int]:
        """The most (gradient, forward-only) passes through the model one run makes, counted on a batch
        the attack never fools; pyautoattack's attacks stop early on the items they fool."""
        return steps, 0

    def _perturb(self, images, labels, targets):  # pragma: no cover - abstract
        raise NotImplementedError


class _GradientAttack(Attack):
    """Shared loop of FGSM and PGD: signed (Linf) or normalised (L2) gradient steps, projected."""

    random_start = True

    def step_size(self) -> float:
        return 2.5 * self.eps / self.steps

    def _loss_gradient(self, x: torch.Tensor, labels, targets) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        logits = self.model(x)
        loss = -F.cross_entropy(logits, targets, reduction="sum") if targets is not None \
            else F.cross_entropy(logits, labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [x])
        return grad

    def _ascend(self, x: torch.Tensor, grad: torch.Tensor, step: float) -> torch.Tensor:
        if self.norm == "Linf":
            return x + step * grad.sign()
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))
        return x + step * grad / norms

    def _project(self, x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        delta = x - images
        if self.norm == "Linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(dim=1).view(-1, *[1] * (delta.dim() - 1))
            delta = delta * (self.eps / norms.clamp_min(1e-12)).clamp(max=1.0)
        return (images + delta).clamp(0, 1)

    def _start(self, images: torch.Tensor) -> torch.Tensor:
        if not self.random_start:
            return images
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.rand(images.shape, generator=generator).to(images) * 2 - 1
        if self.norm == "L2":
            noise = noise / noise.flatten(1).norm(dim=1).view(-1, *[1] * (noise.dim() - 1)) * self.eps * 0.5
        else:
            noise = noise * self.eps
        return self._project(images + noise, images)

    def _perturb(self, images, labels, targets):
        x = self._start(images)
        for _ in range(self.steps):
            x = self._project(self._ascend(x, self._loss_gradient(x, labels, targets), self.step_size()), images)
        return x


class FGSM(_GradientAttack):
    """FGSM (Goodfellow et al., 2015), Linf: one signed-gradient step of size eps from the clean image."""

    name = "fgsm"
    random_start = False

    def __init__(self, model: nn.Module, eps: float, steps: int = 1, targeted: bool = False, seed: int = 0,
                 progress: Progress | None = None) -> None:
        super().__init__(model, eps, 1, targeted, seed, progress)

    @classmethod
    def passes(cls, steps: int) -> tuple[int, int]:
        return 1, 0

    def step_size(self) -> float:
        return self.eps


class PGD(_GradientAttack):
    """PGD (Madry et al., 2018), Linf: random start, ``steps`` signed steps of ``step`` /255 (default 2.5*eps/steps)."""

    name = "pgd"

    def __init__(self, model: nn.Module, eps: float, steps: int = 10, targeted: bool = False, seed: int = 0,
                 progress: Progress | None = None, step: float | None = None) -> None:
        super().__init__(model, eps, steps, targeted, seed, progress)
        self._step = None if step is None else (step / 255 if self.norm == "Linf" else float(step))

    def step_size(self) -> float:
        return self._step if self._step is not None else super().step_size()


class PGDL2(PGD):
    """PGD (Madry et al., 2018), L2: normalised-gradient steps projected on the L2 ball of radius eps."""

    name = "pgd-l2"
    norm = "L2"


class _Reference(Attack):
    """Attacks run by pyautoattack; ``make`` builds the reference object for the current model."""

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def make(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _perturb(self, images, labels, targets):
        return self.make().perturb(images, targets if targets is not None else labels)


class APGD(_Reference):
    """APGD (Croce and Hein, 2020), Linf, with cross-entropy loss; step size adapted on the fly.

    Targeted, it runs APGD-T, which picks the target class from the logits (the best runner-up).
    """

    name = "apgd-ce"
    loss = "ce"

    @classmethod
    def passes(cls, steps: int) -> tuple[int, int]:
        return steps + 2, 0  # and one pass before and one after the steps

    def make(self):
        from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

        if self.targeted:
            attack = APGDAttack_targeted(self.model, n_iter=self.steps, norm=self.norm, eps=self.eps,
                                         seed=self.seed, device=self._device())
            attack.n_target_classes = 1
            return attack
        return APGDAttack(self.model, n_iter=self.steps, norm=self.norm, eps=self.eps, seed=self.seed,
                          loss=self.loss, device=self._device())

    def _perturb(self, images, labels, targets):
        return self.make().perturb(images, labels)


class APGDDLR(APGD):
    """APGD (Croce and Hein, 2020), Linf, with the difference-of-logits-ratio loss (scale invariant)."""

    name = "apgd-dlr"
    loss = "dlr"


class Square(_Reference):
    """Square (Andriushchenko et al., 2020), Linf: random square updates, no gradients; ``steps`` = queries."""

    name = "square"
    gradient_free = True

    @classmethod
    def passes(cls, steps: int) -> tuple[int, int]:
        return 0, steps + 2

    def make(self):
        from pyautoattack.square import SquareAttack

        return SquareAttack(self.model, norm=self.norm, n_queries=self.steps, eps=self.eps, p_init=0.8,
                            seed=self.seed, targeted=self.targeted, loss="ce" if self.targeted else "margin",
                            device=self._device())


class AutoAttack(_Reference):
    """AutoAttack standard (Croce and Hein, 2020): APGD-CE, APGD-T, FAB-T, Square; ``steps`` unused."""

    name = "autoattack"

    @classmethod
    def passes(cls, steps: int) -> tuple[int, int]:
        """APGD-CE, then APGD-T for each of 9 target classes (102 gradient passes each), FAB-T for each of 9
        targets (100 gradient and 100 forward passes each), Square (5,000 queries); ``steps`` is unused."""
        return 10 * APGD.passes(100)[0] + 9 * 100, 9 * 100 + Square.passes(5000)[1]

    def make(self):
        from pyautoattack import AutoAttack as Reference

        reference = Reference(self.model, norm=self.norm, eps=self.eps, seed=self.seed, version="standard",
                              device=self._device())
        reference.verbose = False
        return reference

    broken_by: list[str] = []  # after each call: per item, the component that broke it ("" if none)

    def _perturb(self, images, labels, targets):
        if targets is not None:
            raise ValueError("AutoAttack standard already includes targeted attacks; run it untargeted.")
        reference = self.make()
        self._watch_components(reference, images, labels)
        adversarial, _ = reference.run_standard_evaluation(images, labels, batch_size=len(images))
        return adversarial

    def _watch_components(self, reference, images, labels) -> None:
        """Record which component breaks each item, for per-item results.

        AutoAttack runs its components in turn on the items no earlier one broke, in item order;
        wrapping each component's ``perturb`` follows the same items.
        """
        with torch.no_grad():
            attacked = (reference.get_logits(images).argmax(1) == labels).nonzero().flatten().tolist()
        self.broken_by = [""] * len(images)

        def watched(component, name_of):
            perturb = component.perturb

            def run(x, y):
                nonlocal attacked
                adversarial = perturb(x, y)
                with torch.no_grad():
                    fooled = (reference.get_logits(adversarial).argmax(1) != y).tolist()
                for item, broke in zip(attacked, fooled):
                    if broke:
                        self.broken_by[item] = name_of()
                attacked = [item for item, broke in zip(attacked, fooled) if not broke]
                return adversarial
            return run

        reference.apgd.perturb = watched(reference.apgd, lambda: f"apgd-{reference.apgd.loss}")
        reference.apgd_targeted.perturb = watched(reference.apgd_targeted, lambda: "apgd-t")
        reference.fab.perturb = watched(reference.fab, lambda: "fab-t" if reference.fab.targeted else "fab")
        reference.square.perturb = watched(reference.square, lambda: "square")


ATTACKS: dict[str, type[Attack]] = {a.name: a for a in (FGSM, PGD, PGDL2, APGD, APGDDLR, Square, AutoAttack)}


def make_attack(name: str, model: nn.Module, eps: float, steps: int = 10, targeted: bool = False,
                seed: int = 0, step: float | None = None, progress: Progress | None = None) -> Attack:
    """An attack by name (see ``ATTACKS``) against ``model``; ``step`` (user units) is PGD's only;
    ``progress(done, total)`` hears of every pass through the model and may raise to stop the attack."""
    if name not in ATTACKS:
        raise KeyError(f"Unknown attack {name!r}; choose one of {', '.join(ATTACKS)}.")
    if step is not None and not issubclass(ATTACKS[name], PGD):
        raise ValueError(f"{name} chooses its own step size; --step applies to pgd and pgd-l2 only.")
    extra = {"step": step} if step is not None else {}
    return ATTACKS[name](model, eps, steps, targeted, seed, progress, **extra)
