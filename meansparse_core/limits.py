"""What one request from the app may ask for, and alphas typed by a user checked against it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one request from the app may ask for.

    A teaching server is shared by a room: no single click may queue hours of work or hold
    gigabytes. Raise them here for a private machine.
    """

    items: int = 1000  # test images per accuracy sweep
    alphas: int = 12  # alphas per sweep, besides alpha 0
    steps: int = 200  # iterations of one attack
    square_queries: int = 5000
    image_pixels: int = 40_000_000  # of an uploaded image, checked before it is decoded
    live_set: int = 50  # test images behind the live figures: 2 x 50 forward passes per alpha
    slider_max: float = 2.0  # the alpha slider's range starts at 0
    slider_step: float = 0.01

    def steps_for(self, attack: str) -> int:
        return self.square_queries if attack == "square" else self.steps

    def slider_alphas(self) -> tuple[float, ...]:
        """Every alpha the slider can stop at."""
        return tuple(round(i * self.slider_step, 6) for i in range(round(self.slider_max / self.slider_step) + 1))


LIMITS = Limits()


def parse_alphas(text: str, limits: Limits = LIMITS) -> tuple[float, ...]:
    """Alphas typed as "0.1, 0.2; 0.3": sorted, distinct, each in [0, 10], at most ``limits.alphas``."""
    try:
        values = tuple(sorted({float(a) for a in text.replace(";", ",").split(",") if a.strip()}))
    except ValueError:
        raise ValueError(f"Alphas must be numbers separated by commas, e.g. 0.1, 0.2; got {text!r}.") from None
    if not values or not all(0 <= a <= 10 for a in values):
        raise ValueError("Give at least one alpha, each between 0 and 10.")
    if len(values) > limits.alphas:
        raise ValueError(f"Give at most {limits.alphas} alphas per sweep; you gave {len(values)}.")
    return values
