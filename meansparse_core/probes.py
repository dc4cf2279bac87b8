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
from .model_modes import eval_mode
from .routing import route_taps
from .taps import Tap
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


@dataclass(frozen=True)
class Perturbation:
    """The perturbation's size at one tap: L2 norms over the tap's features of one image, averaged over images.

    * ``base``: ||g(x+d) - g(x)||, g the tap's input in the base model (MeanSparse nowhere);
    * ``before``: the same at the tap's input in the sparsified model (earlier taps sparsified);
    * ``after``: the same at the operator's output, which is what flows on.

    ``before`` split by where the clean and the adversarial value of each feature lie:

    * ``removed``: the part of ``before`` where both lie inside the band (both become the mean: gone);
    * ``passed``: the part where both lie outside (unchanged);
    * ``created``: the part of ``after`` where one lies inside and the other outside, so one of them
      jumps to the mean: a change of at least alpha * sigma however small the perturbation was.

    For each image, after^2 = passed^2 + created^2.
    """

    base: float
    before: float
    after: float
    removed: float
    passed: float
    created: float


@dataclass(frozen=True, eq=False)
class TapProbe:
    """Summaries of one tap at the probed alpha.

    ``standardized`` holds whole-layer values (x - mu_c) / sigma_c, with sigma_c taken as 1 for
    zero-std channels (never replaced) so that every value stays finite. ``channel_values`` holds
    raw values of channel ``channel``; the operator's band there is channel_mean +- alpha *
    channel_std. Fractions replaced are exact over all values of the tap input in the sparse pass.

    ``perturbation`` holds absolute sizes; ``relative`` the same sizes each divided by one
    denominator, ``clean_norm`` = ||g(x)||, the norm of the *base* model's clean features at this tap
    (per image, then averaged over the images where it is not 0). Both models' lines share it, so they
    compare: a denominator taken from the sparsified features would shrink as alpha grows.
    """

    name: str
    channels: int
    channel_dim: int
    alpha: float
    channel: int
    channel_mean: float
    channel_std: float
    fraction_replaced_clean: float
    fraction_replaced_adv: float
    clean_norm: float
    perturbation: Perturbation
    relative: Perturbation
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


def _halves(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean and the adversarial half of a stacked batch, one float64 row per image."""
    clean, adv = features.reshape(2, features.shape[0] // 2, -1).double()
    return clean, adv


def _norms(features: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(features, dim=1)


def _mean(values: torch.Tensor) -> float:
    """Mean over the images where ``values`` is finite (0.0 when there is none)."""
    finite = values[torch.isfinite(values)]
    return finite.mean().item() if len(finite) else 0.0


def _sparse_perturbation(before: torch.Tensor, after: torch.Tensor, inside: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image sizes of the perturbation around the operator (see ``Perturbation``) from stacked
    clean/adversarial batches of its input, its output, and the in-band test of its input."""
    (clean, adv), (clean_after, adv_after) = _halves(before), _halves(after)
    in_clean, in_adv = inside.reshape(2, inside.shape[0] // 2, -1)
    change, change_after = adv - clean, adv_after - clean_after
    return {
        "before": _norms(change), "after": _norms(change_after),
        "removed": _norms(change * (in_clean & in_adv)), "passed": _norms(change * ~(in_clean | in_adv)),
        "created": _norms(change_after * (in_clean ^ in_adv)),
    }


def _sizes(per_image: dict[str, torch.Tensor], clean_norm: torch.Tensor) -> tuple[Perturbation, Perturbation, float]:
    """(absolute sizes, sizes over the base model's clean norm, that norm), each averaged over images.

    Relative sizes leave out images whose clean norm is 0 or not finite (the ratio is undefined there)."""
    defined = (clean_norm > 0) & torch.isfinite(clean_norm)
    absolute = Perturbation(**{k: _mean(v) for k, v in per_image.items()})
    relative = Perturbation(**{k: _mean(v[defined] / clean_norm[defined]) for k, v in per_image.items()})
    return absolute, relative, _mean(clean_norm)


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
    # Per tap, per image: (||g(x+d) - g(x)||, ||g(x)||) in the base pass; the features themselves are dropped.
    base_norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    probes: list[TapProbe] = []

    def check_batch(tap: Tap, x: torch.Tensor) -> None:
        # Clean and adversarial halves are split along axis 0, so it must still be the batch axis.
        if x.dim() < 2 or x.shape[0] != 2 * clean.shape[0]:
            raise ValueError(f"tap {tap.name!r} has features {tuple(x.shape)} without the batch on axis 0.")

    def record_base(tap: Tap, x: torch.Tensor) -> torch.Tensor:
        check_batch(tap, x)
        clean_features, adv_features = _halves(x)
        base_norms[tap.name] = _norms(adv_features - clean_features), _norms(clean_features)
        return x

    def record_sparse(tap: Tap, x: torch.Tensor) -> torch.Tensor:
        check_batch(tap, x)
        s, a, c, axis = by_name[tap.name], alphas[tap.name], channels[tap.name], tap.channel_dim
        y = sparsify(x, s.mean, s.std, a, axis)
        # The operator's own test, so that the fraction counts exactly the values it replaced.
        inside = (x - channel_view(s.mean, x, axis)).abs() < channel_view(s.std, x, axis) * a
        half = inside.numel() // 2
        fraction_clean, fraction_adv = (inside.reshape(2, -1).sum(dim=1).double() / half).tolist()
        base_change, clean_norm = base_norms.pop(tap.name)
        absolute, relative, mean_clean_norm = _sizes({"base": base_change, **_sparse_perturbation(x, y, inside)},
                                                     clean_norm)

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
            fraction_replaced_clean=fraction_clean, fraction_replaced_adv=fraction_adv,
            clean_norm=mean_clean_norm, perturbation=absolute, relative=relative,
            standardized=standardized, channel_values=channel_values,
        ))
        return y

    device = next(model.parameters(), clean).device
    batch = torch.cat([clean, adversarial]).to(device)
    with eval_mode(model), torch.no_grad():
        route_taps(model, taps, record_base, batch)
        route_taps(model, taps, record_sparse, batch)
    return probes
