"""Architectures of the bundled demo models, by name. Each takes images in [0, 1]."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel standardisation inside the model, so every model takes [0, 1] images."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def digits_cnn() -> nn.Module:
    """A small CNN for 1x8x8 digits: three conv blocks and a two-layer head (about 160k parameters)."""
    return nn.Sequential(
        Normalize((0.30,), (0.38,)),
        *_conv_bn_relu(1, 32), *_conv_bn_relu(32, 64), nn.MaxPool2d(2),
        *_conv_bn_relu(64, 128), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10),
    )


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {"digits-cnn": digits_cnn}


def build_architecture(name: str) -> nn.Module:
    """A fresh, randomly initialised instance of a named architecture."""
    if name not in ARCHITECTURES:
        raise KeyError(f"Unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[name]()
