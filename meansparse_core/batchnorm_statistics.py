"""Statistics without the training set: read from the BatchNorm layers that feed the taps.

A BatchNorm in eval mode computes ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``.
Where ``x`` has the running mean and variance (the training features, as far as the running
averages caught them), the output has per-channel mean ``bias`` and standard deviation
``|weight| * sqrt(running_var / (running_var + eps))``: MeanSparse's statistics at a tap whose input
is that output, with no data at all. It is an estimate: running averages are collected in train
mode, batch by batch (adversarial batches under adversarial training). ``benchmarks/
batchnorm_statistics_agreement.py`` measures what it changes against the exact statistics.

A tap is fed by a BatchNorm when its input *is* the BatchNorm's output tensor, unchanged: passed on
directly, or through modules that return their input (identity, dropout in eval mode). An in-place
change after the BatchNorm (``out += shortcut``) breaks the link; such taps, and those after residual
additions, need images: a folder of any photos or the built-in ones (``photos.py``), no labels.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from .data import Preparation
from .discovery import find_taps, placement_of
from .model_modes import eval_mode
from .photos import builtin_photos
from .placement_rules import Placement
from .routing import route_taps
from .statistics import Statistics, TapStatistics, calibrate
from .taps import Tap

ESTIMATOR = "batchnorm"


class MissingStatistics(ValueError):
    """Some taps have no BatchNorm to read statistics from, and no photos were given."""


def _batchnorms(model: nn.Module) -> dict[nn.Module, str]:
    """The BatchNorm layers that keep running statistics, by module, with their names."""
    return {m: name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_var is not None}


@torch.no_grad()
def batchnorm_feeds(model: nn.Module, taps: list[Tap], example: torch.Tensor) -> dict[str, str]:
    """For each tap whose input is a BatchNorm's unchanged output (eval mode), the BatchNorm's name."""
    layers = _batchnorms(model)
    outputs: list[tuple[torch.Tensor, int, str]] = []  # kept alive: no later tensor can reuse their memory

    def remember(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        outputs.append((output, output._version, layers[module]))

    feeds: dict[str, str] = {}

    def check(tap: Tap, x: torch.Tensor) -> torch.Tensor:
        for output, version, name in reversed(outputs):  # the latest BatchNorm first
            same = (x.data_ptr() == output.data_ptr() and x.shape == output.shape and x.stride() == output.stride())
            # A changed version means an in-place operation wrote into the output since (out += shortcut).
            if same and x._version == version and tap.channel_dim % x.dim() == 1 and x.shape[1] == tap.channels:
                feeds[tap.name] = name
                break
        return x

    hooks = [m.register_forward_hook(remember) for m in layers]
    try:
        with eval_mode(model):
            route_taps(model, taps, check, example)
    finally:
        for hook in hooks:
            hook.remove()
    return feeds


def _read(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The (mean, std) a BatchNorm's output has when its input has the running statistics."""
    var = layer.running_var.double().cpu()
    scale = layer.weight.detach().double().cpu().abs() if layer.weight is not None else torch.ones_like(var)
    mean = layer.bias.detach().double().cpu() if layer.bias is not None else torch.zeros_like(var)
    return mean, scale * torch.sqrt(var / (var + layer.eps))


def batchnorm_statistics(model: nn.Module, input_size: tuple[int, ...], placement: str | Placement = "activations",
                         photos: torch.Tensor | None = None, photos_source: str = "photos",
                         meta: dict[str, str | int | float] | None = None) -> Statistics:
    """Statistics for every tap of ``model``: read from the BatchNorm feeding it, or, where none does,
    calibrated on ``photos`` ((N, C, H, W) in [0, 1], named by ``photos_source``). Each tap records
    its source. MissingStatistics names the taps left without statistics when no photos are given.
    """
    resolved = placement_of(model, placement)
    device = next(model.parameters()).device
    example = torch.zeros(1, *input_size, device=device)
    taps = find_taps(model, example, resolved)
    feeds = batchnorm_feeds(model, taps, example)
    unfed = [t for t in taps if t.name not in feeds]
    if unfed and photos is None:
        raise MissingStatistics(_missing(model, taps, unfed))
    measured = (calibrate(model, photos.to(device).split(16), total=len(photos), placement=resolved)
                if unfed else None)
    layers = dict(model.named_modules())
    stats = []
    for tap in taps:
        if tap.name in feeds:
            mean, std = _read(layers[feeds[tap.name]])
            stats.append(TapStatistics(tap, mean, std, count=0, source=f"BatchNorm {feeds[tap.name]}"))
        else:
            found = measured[tap.name]
            stats.append(TapStatistics(tap, found.mean, found.std, found.count, source=photos_source))
    recorded = {"estimator": ESTIMATOR, "n_images": len(photos) if unfed else 0, **(meta or {})}
    return Statistics(stats, recorded, resolved, tuple(input_size))


def without_training_images(model: nn.Module, input_size: tuple[int, ...], preparation: Preparation | None = None,
                            placement: str | Placement = "activations",
                            meta: dict[str, str | int | float] | None = None) -> Statistics:
    """Statistics with no data set at all: from the BatchNorm feeding each tap, and for the taps no
    BatchNorm feeds, from the built-in photos (``photos.py``; PhotosUnavailable without them)."""
    try:
        return batchnorm_statistics(model, input_size, placement, meta=meta)
    except MissingStatistics:
        photos = builtin_photos(input_size, preparation)
        return batchnorm_statistics(model, input_size, placement, photos, builtin_source(len(photos)), meta)


def builtin_source(count: int) -> str:
    """How statistics measured on the built-in photos name their source."""
    return f"{count} built-in photos"


def _missing(model: nn.Module, taps: list[Tap], unfed: list[Tap]) -> str:
    named = ", ".join(t.name for t in unfed[:6]) + (f" and {len(unfed) - 6} more" if len(unfed) > 6 else "")
    what = (f"{type(model).__name__} has no BatchNorm layer feeding its taps" if len(unfed) == len(taps) else
            f"No BatchNorm feeds {len(unfed)} of the {len(taps)} taps of {type(model).__name__} ({named})")
    return (f"{what}, so their statistics need images: give a folder of any photos (no labels needed) or use "
            "the built-in photos; no statistics were made.")


def describe_sources(stats: Statistics) -> str:
    """Where the taps' statistics come from, in a few words, e.g. "BatchNorm layers at 16 taps, 5
    built-in photos at 4 taps"; "" when the statistics do not say."""
    counts = Counter("BatchNorm layers" if t.source.startswith("BatchNorm ") else t.source
                     for t in stats.taps if t.source)
    if not counts:
        return ""
    return ", ".join(f"{source} at {n} of {len(stats.taps)} taps" for source, n in counts.items())
