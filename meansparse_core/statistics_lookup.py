"""Statistics for a model without calibrating: a cached calibration, the statistics shipped with a
bundled model, or the buffers of the MeanSparse layers a released model carries."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .batchnorm_statistics import ESTIMATOR as BATCHNORM, describe_sources
from .discovery import find_taps, placement_of
from .files import discard_damaged
from .models import ModelSpec, bundled_statistics_path
from .paths import cache_folder
from .placement_rules import ACTIVATIONS, Placement
from .statistics import Statistics, embedded_statistics
from .taps import own_layers

def _placement_tag(placement: str | Placement) -> str:
    """A file-name part for a placement: none for "activations" (the files it always had)."""
    name = placement.name if isinstance(placement, Placement) else placement
    if name == "activations":
        return ""
    if name == "released":
        return "__released"
    return "__rule-" + hashlib.sha256(name.encode()).hexdigest()[:10]


def statistics_path(spec: ModelSpec, data: str, weights_digest: str | None = None,
                    cache: Path | None = None, placement: str | Placement = "activations") -> Path:
    """Where calibrated statistics are cached: per model (and user checkpoint), dataset and placement."""
    weights = f"__{weights_digest}" if weights_digest else ""
    name = f"{spec.key}{weights}__{data}{_placement_tag(placement)}"
    return (cache or cache_folder("stats")) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.pt"


@dataclass(frozen=True)
class FoundStatistics:
    """Statistics for a model, where they came from, and what was discarded on the way (or None)."""

    stats: Statistics
    origin: str
    discarded: str | None = None


def find_statistics(spec: ModelSpec, model: nn.Module, data: str, weights_digest: str | None = None,
                    cache: Path | None = None, placement: str | Placement = "activations") -> FoundStatistics | None:
    """Statistics for ``model`` with this ``placement``, without calibrating; None if there are none.

    Looked up in order: a calibration cached for this model, data and placement, the statistics
    shipped with a bundled model (placement "activations"), and the buffers of MeanSparse layers
    already inside the model (RobustBench's sparsified models: those layers are their taps, whatever
    the placement). A cached file that is damaged or whose taps are not the model's is discarded
    with a ``CacheWarning`` and the search goes on.
    """
    example = torch.zeros(1, *spec.input_size, device=next(model.parameters()).device)
    resolved = placement_of(model, placement)  # an unknown placement is the caller's error, not the file's
    cached = statistics_path(spec, data, weights_digest, cache, placement)
    discarded = None
    try:
        stats = Statistics.load(cached)
        if stats.tap_list != find_taps(model, example, resolved):
            raise ValueError("its layers are not this model's")
        how = (f"no training images: {describe_sources(stats)}" if stats.meta.get("estimator") == BATCHNORM else
               f"calibrated on {stats.meta.get('n_images', '?')} {data} training images")
        return FoundStatistics(stats, f"{how} (cached)")
    except FileNotFoundError:
        pass
    except ValueError as exc:
        discarded = discard_damaged(cached, str(exc))
    bundled = (bundled_statistics_path(spec) if spec.source == "bundled" and not weights_digest
               and resolved == ACTIVATIONS else None)
    if bundled is not None and bundled.exists():
        stats = Statistics.load(bundled)
        return FoundStatistics(stats, f"shipped with the model ({stats.meta.get('n_images', '?')} {spec.dataset} training images)",
                               discarded)
    if own_layers(model):
        return FoundStatistics(embedded_statistics(model, example), "the model's own MeanSparse layers", discarded)
    return None
