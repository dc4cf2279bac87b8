"""Probes: what MeanSparse does to every tap's features for a few clean and adversarial images.

Two forward passes run on the clean and adversarial images stacked into one batch:

* the *base* pass through the unmodified network; its tap inputs are the "base features";
* the *sparse* pass through the sparsified network; at each tap, "before" is the tap's input there
  (which already depends on the sparsification of every earlier tap) and "after" is the operator's
  output, which is what flows onward.

Every tap is reduced to small summaries inside the forward pass, so no more than one layer's
features are alive at a time, however deep the model. Example::

    probes = probe(model, stats, x, x_adv, alpha=0.25, channel={"layer1.0:relu": 5})
    edges = probes[0].standardized.edges(bins=60)
    counts, _ = histogram(probes[0].standardized.clean_before, edges)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .operator import channel_view, sparsify
from .placement import Tap, eval_mode, route_taps
from .statistics import Statistics


@dataclass(frozen=True, eq=False)
class Sample:
    """Values of one tap drawn at the same positions from its four views (sparse pass).

    Pairing the positions means ``clean_after[i]`` is the operator's output for ``clean_before[i]``,
    and ``adv_before[i]`` is the same feature as ``clean_before[i]`` for the adversarial image.
    """

    clean_before: np.ndarray
    clean_after: np.ndarray
    adv_before: np.ndarray
    adv_after: np.ndarray

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return (self.clean_before, self.clean_after, self.adv_before, self.adv_after)

    def edges(self, bins: int = 50) -> np.ndarray:
        """Bin edges shared by the four views, so that their histograms overlay."""
        return shared_edges(*self.arrays(), bins=bins)


@dataclass(frozen=True, eq=False)
class TapProbe:
    """Summaries of one tap at the probed alpha.

    ``standardized`` holds whole-layer values (x - mu_c) / sigma_c, with sigma_c taken as 1 for
    zero-std channels (never clamped) so that every value stays finite. ``channel_values`` holds
    raw values of channel ``channel``; the operator's band there is channel_mean +- alpha *
    channel_std. Fractions clamped are exact over all values of the tap input in the sparse pass.
    Attenuations are ||f(x_adv) - f(x)|| / ||f(x)|| per image (L2 over all of the tap's features),
    averaged over the images with f(x) != 0 (0.0 when there is none): f is the base tap input for
    ``attenuation_base`` and the sparsified tap output for ``attenuation_sparse``.
    """

    name: str
    channels: int
    channel_dim: int
    alpha: float
    channel: int
    channel_mean: float
    channel_std: float
    fraction_clamped_clean: float
    fraction_clamped_adv: float
    attenuation_base: float
    attenuation_sparse: float
    standardized: Sample
    channel_values: Sample


def histogram(
    values: np.ndarray, bins: int | np.ndarray = 50, range: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Counts and edges of ``values``, as ``numpy.histogram``; pass shared edges as ``bins`` to overlay."""
    return np.histogram(values, bins=bins, range=range)


def shared_edges(*arrays: np.ndarray, bins: int = 50) -> np.ndarray:
    """``bins + 1`` edges spanning every finite value of ``arrays``.

    NaN and infinite values (a diverging model, say) are left out of the range, and so out of
    every histogram drawn on these edges, instead of making the range itself undefined.
    """
    values = np.concatenate([np.ravel(a) for a in arrays])
    return np.histogram_bin_edges(values[np.isfinite(values)], bins=bins)


def _per_tap(value, default, taps: list[Tap], what: str) -> dict[str, object]:
    """Expand a single value or a {tap name: value} mapping (missing names: ``default``) to every tap."""
    if not isinstance(value, Mapping):
        return {t.name: value for t in taps}
    unknown = set(value) - {t.name for t in taps}
    if unknown:
        raise KeyError(f"{what} names no tap {sorted(unknown)[0]!r}; see Statistics.tap_list.")
    return {t.name: value.get(t.name, default) for t in taps}


def _positions(size: int, max_values: int, generator: torch.Generator) -> torch.Tensor:
    """Flat positions to keep: all of them when few enough, else a uniform subset without repeats."""
    if size <= max_values:
        return torch.arange(size)
    return torch.randperm(size, generator=generator)[:max_values]


def _sample(
    before: torch.Tensor, after: torch.Tensor, positions: torch.Tensor, center: np.ndarray | float, scale: np.ndarray | float
) -> Sample:
    """Four views at ``positions`` of each half (clean, adversarial) of the stacked batch, as
    float64 ``(value - center) / scale``; float64 keeps tiny-std channels from overflowing."""
    positions = positions.to(before.device)
    b, a = ((t.reshape(2, -1)[:, positions].double().cpu().numpy() - center) / scale for t in (before, after))
    return Sample(clean_before=b[0], clean_after=a[0], adv_before=b[1], adv_after=a[1])


def _attenuation(features: torch.Tensor) -> float:
    """Mean over images of ||adv - clean|| / ||clean||; images whose ratio is undefined (clean
    features all zero, or not finite) are left out."""
    clean, adv = features.reshape(2, features.shape[0] // 2, -1)
    change = torch.linalg.vector_norm(adv - clean, dim=1, dtype=torch.float64)
    norm = torch.linalg.vector_norm(clean, dim=1, dtype=torch.float64)
    defined = (norm > 0) & torch.isfinite(norm) & torch.isfinite(change)
    return (change[defined] / norm[defined]).mean().item() if defined.any() else 0.0


def probe(
    model: nn.Module,
    stats: Statistics,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    alpha: float,
    layer_alphas: Mapping[str, float] | None = None,
    channel: int | Mapping[str, int] = 0,
    max_values: int = 20_000,
    seed: int = 0,
) -> list[TapProbe]:
    """Probe every tap of ``model`` (in forward order) at ``alpha`` for clean and adversarial images.

    Args:
        clean, adversarial: batches of the same shape (N, ...) in the model's input space.
        alpha: MeanSparse threshold; ``layer_alphas`` overrides it for the taps it names.
        channel: channel whose raw values are sampled, for every tap or per tap name (default 0).
        max_values: most positions sampled per tap and view; ``seed`` makes the choice repeatable.

    The model runs in eval mode without gradients; its mode is restored and its weights are never
    touched. Clean and adversarial images share one batch, so eval-mode layers must treat images
    independently (as eval-mode batch norm does).
    """
    if clean.shape != adversarial.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and adversarial {tuple(adversarial.shape)} differ in shape.")
    if max_values < 1:
        raise ValueError(f"max_values must be >= 1, got {max_values}.")
    taps = stats.tap_list
    alphas = _per_tap(layer_alphas or {}, alpha, taps, "layer_alphas")
    channels = _per_tap(channel, 0, taps, "channel")
    for tap in taps:
        if not 0 <= channels[tap.name] < tap.channels:
            raise ValueError(f"tap {tap.name!r} has {tap.channels} channels; channel {channels[tap.name]} is out of range.")
    by_name = {s.tap.name: s for s in stats.taps}
    generator = torch.Generator().manual_seed(seed)
    base_attenuation: dict[str, float] = {}
    probes: list[TapProbe] = []

    def check_batch(tap: Tap, x: torch.Tensor) -> None:
        # Clean and adversarial halves are split along axis 0, so it must still be the batch axis.
        if x.dim() < 2 or x.shape[0] != 2 * clean.shape[0]:
            raise ValueError(f"tap {tap.name!r} has features {tuple(x.shape)} without the batch on axis 0.")

    def record_base(tap: Tap, x: torch.Tensor) -> torch.Tensor:
        check_batch(tap, x)
        base_attenuation[tap.name] = _attenuation(x)
        return x

    def record_sparse(tap: Tap, x: torch.Tensor) -> torch.Tensor:
        check_batch(tap, x)
        s, a, c, axis = by_name[tap.name], alphas[tap.name], channels[tap.name], tap.channel_dim
        y = sparsify(x, s.mean, s.std, a, axis)
        # The operator's own test, so that the fraction counts exactly the values it replaced.
        clamped = ((x - channel_view(s.mean, x, axis)).abs() < channel_view(s.std, x, axis) * a).reshape(2, -1)
        half = clamped.shape[1]
        fraction_clean, fraction_adv = (clamped.sum(dim=1).double() / half).tolist()

        mean, std = s.mean.double().cpu().numpy(), s.std.double().cpu().numpy()
        positions = _positions(half, max_values, generator)
        inner = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
        of_channel = ((positions // inner) % tap.channels).numpy()
        scale = np.where(std > 0, std, 1.0)
        standardized = _sample(x, y, positions, mean[of_channel], scale[of_channel])
        channel_positions = _positions(half // tap.channels, max_values, generator)
        channel_values = _sample(x.select(axis, c), y.select(axis, c), channel_positions, 0.0, 1.0)

        probes.append(TapProbe(
            name=tap.name, channels=tap.channels, channel_dim=axis, alpha=float(a), channel=c,
            channel_mean=float(mean[c]), channel_std=float(std[c]),
            fraction_clamped_clean=fraction_clean, fraction_clamped_adv=fraction_adv,
            attenuation_base=base_attenuation[tap.name], attenuation_sparse=_attenuation(y),
            standardized=standardized, channel_values=channel_values,
        ))
        return y

    device = next(model.parameters(), clean).device
    batch = torch.cat([clean, adversarial]).to(device)
    with eval_mode(model), torch.no_grad():
        route_taps(model, taps, record_base, batch)
        route_taps(model, taps, record_sparse, batch)
    return probes
