"""What an attack costs on this machine, measured before the work starts.

On a laptop CPU, PGD on one 224x224 photo takes seconds for a ResNet-18 and minutes for a
ConvNeXt-L; AutoAttack on the same photo can take an hour. ``measure`` times one forward pass and
one forward-and-backward pass of one image (their mean over a third of a second, after a warm-up
pass: one run on a busy machine can be several times too slow or too fast), and ``Cost`` turns them, with each attack's
count of passes (``attacks.Attack.passes``), into the time of an attack, so a page can say so before
anyone presses a button, and a server can send work that is not quick to its job queue. Example::

    cost = measure(model, (3, 224, 224))
    print(cost.describe("pgd", 10))        # PGD-10 on this image: about 3 s on this CPU
    print(cost.warning("autoattack", 100))  # None, or a sentence to show before starting
    cost.quick("pgd", 200)                 # False: a shared server queues it
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .attacks import ATTACKS

#: Work expected to take longer than this gets a warning before it starts.
PATIENCE_S = 60.0

#: Work expected to take longer than this is not quick: a shared server runs it in its job queue
#: rather than in the thread that draws a user's page.
QUICK_S = 1.5

#: The attack's own work besides the model, per pass on one image, on a quiet machine: pyautoattack's
#: steps on small tensors. Measured on a 2-core CPU with the digits demo model (0.3 ms per pass): about
#: 0.5 ms per pass in Square and AutoAttack, 1 ms in APGD; it is most of the time on a model that small.
#: ``measure`` times a stand-in for it (``_bookkeeping``), which a busy machine slows as it slows the attack.
BOOKKEEPING_S = 0.5e-3

#: Each pass is timed over this much wall time (at least one run): a busy machine shares its cores
#: out in slices of milliseconds, so a single short run can miss the wait that every long attack meets.
WINDOW_S = 0.3


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 90 * 60:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


@dataclass(frozen=True)
class Cost:
    """Measured times of one image's passes through one model on one device."""

    forward_s: float
    gradient_s: float  # forward and backward
    parameters: int
    device: str  # "this CPU", "this GPU (NVIDIA H100 ...)"
    bookkeeping_s: float = BOOKKEEPING_S  # the attack's own work per pass (see ``BOOKKEEPING_S``)

    def seconds(self, attack: str, steps: int, images: int = 1) -> float:
        """The longest ``attack`` can take on ``images`` images, one at a time (it runs every step on every image)."""
        gradient, forward = ATTACKS[attack].passes(steps)
        return images * (gradient * self.gradient_s + forward * self.forward_s + (gradient + forward) * self.bookkeeping_s)

    def quick(self, attack: str, steps: int, images: int = 1) -> bool:
        """Whether the work is expected to take at most ``QUICK_S`` (short enough to wait for on a page)."""
        return self.seconds(attack, steps, images) <= QUICK_S

    def describe(self, attack: str, steps: int, images: int = 1) -> str:
        what = f"{attack.upper()}" if attack in ("fgsm", "autoattack") else f"{attack.upper()}-{steps}"
        on = "this image" if images == 1 else f"{images} images"
        bound = "up to " if attack == "autoattack" else ""
        return f"{what} on {on}: {bound}{_duration(self.seconds(attack, steps, images))} on {self.device}"

    def warning(self, attack: str, steps: int, images: int = 1) -> str | None:
        """A sentence to show before work expected to outlast ``PATIENCE_S``; None when it is quick."""
        if self.seconds(attack, steps, images) <= PATIENCE_S:
            return None
        size = f"{self.parameters / 1e6:.0f}M-parameter model"
        fewer = "Fewer steps or images" if images > 1 else "Fewer steps"
        return f"{self.describe(attack, steps, images)} with this {size}. {fewer}, a smaller model or a GPU make it shorter."


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"this GPU ({torch.cuda.get_device_name(device)})"
    return f"this {device.type.upper()}"


def _timed(run, device: torch.device) -> float:
    """Seconds per run, over runs filling ``WINDOW_S`` (at least one) after a warm-up run (first calls
    allocate and pick kernels)."""
    run()
    runs, start = 0, time.perf_counter()
    while runs < 1 or time.perf_counter() - start < WINDOW_S:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        runs += 1
    return (time.perf_counter() - start) / runs


def measure(model: nn.Module, input_size: tuple[int, int, int]) -> Cost:
    """Time a forward and a forward-and-backward pass of one random image through ``model``.

    The model is only read: its weights get no gradient and it stays in the mode it was in.
    """
    parameter = next(model.parameters())
    image = torch.rand(1, *input_size, device=parameter.device)

    @torch.no_grad()
    def forward() -> None:
        model(image)

    def gradient() -> None:
        x = image.clone().requires_grad_(True)
        torch.autograd.grad(model(x).sum(), x)

    return Cost(_timed(forward, parameter.device), _timed(gradient, parameter.device),
                sum(p.numel() for p in model.parameters()), _device_name(parameter.device),
                BOOKKEEPING_S * _timed(lambda: _bookkeeping(image), parameter.device) / QUIET_BOOKKEEPING_S)


#: ``_bookkeeping``'s time on one 8x8 image, one torch thread, on the 2-core CPU where ``BOOKKEEPING_S`` was measured.
QUIET_BOOKKEEPING_S = 0.25e-3


def _bookkeeping(image: torch.Tensor) -> None:
    """Small-tensor work like an attack step's besides the model: a step, a projection, a few checks."""
    x = image.clone()
    for _ in range(4):
        step = torch.sign(torch.randn_like(x)) * 0.01
        x = torch.min(torch.max(x + step, image - 0.03), image + 0.03).clamp(0, 1)
        (x - image).abs().flatten(1).max(dim=1)[0].le(0.03).all().item()
