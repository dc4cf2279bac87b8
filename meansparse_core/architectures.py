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


class Residual(nn.Module):
    """``x + body(x)`` with two conv blocks of the same width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(width, width), *_conv_bn_relu(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def cifar_resnet9(width: int = 24) -> nn.Module:
    """A narrow ResNet-9 for 3x32x32 images (widths w, 2w, 4w, 8w; about 0.93M parameters at w=24).

    Narrow so that adversarial training fits a 2-core CPU and one PGD-10 attack on one image is
    interactive. Its weights are channels-last, so every convolution runs channels-last (oneDNN),
    for any input layout: on a CPU its forward pass with MeanSparse is 1.6x as fast and an
    attack's input-gradient pass 1.3x (``benchmarks/b7_layout.py``).
    """
    w = width
    model = nn.Sequential(
        Normalize((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
        *_conv_bn_relu(3, w), *_conv_bn_relu(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w),
        *_conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2),
        *_conv_bn_relu(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, 10),
    )
    return model.to(memory_format=torch.channels_last)


class PreActBlock(nn.Module):
    """A pre-activation residual block (He et al., 2016): BN-ReLU-conv twice, a 1x1 shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        # the projection reads the activated input, as in the pre-activation paper's code
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return out + shortcut


def cifar_preact_resnet18() -> nn.Module:
    """PreAct ResNet-18 for 3x32x32 images, the network of most CIFAR-10 adversarial-training baselines.

    Widths 64, 128, 256, 512, two blocks each; 11.17M parameters (22.3 MB in fp16); 17 ReLUs,
    each fed by a BatchNorm. Channels-last, like the ResNet-9s.
    """
    blocks, cin = [], 64
    for width, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
        blocks.append(PreActBlock(cin, width, stride))
        cin = width
    model = nn.Sequential(
        Normalize((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
        nn.Conv2d(3, 64, 3, 1, 1, bias=False), *blocks, nn.BatchNorm2d(512), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10),
    )
    return model.to(memory_format=torch.channels_last)


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "digits-cnn": digits_cnn,
    "cifar-resnet9": cifar_resnet9,
    # The GPU-trained demo model: the same network at the width of the usual ResNet-9 (6.57M
    # parameters, 13 MB in fp16); one PGD-10 attack on one image still runs in well under 0.5 s
    # on a 2-core CPU.
    "cifar-resnet9-w64": lambda: cifar_resnet9(64),
    "cifar-preact-resnet18": cifar_preact_resnet18,
}


def build_architecture(name: str) -> nn.Module:
    """A fresh, randomly initialised instance of a named architecture."""
    if name not in ARCHITECTURES:
        raise KeyError(f"Unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[name]()
