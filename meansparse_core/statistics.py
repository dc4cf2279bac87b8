"""Per-channel statistics of the features at every tap over a calibration set.

The default ("exact") estimator merges moments batch by batch with Chan et al.'s parallel update in
float64, so the result is the mean and (population) standard deviation over all positions of the
whole set, not an average of per-batch figures. Positions are batch and spatial positions for
(N,C,H,W) features, batch and token positions for channel-last features. The "authors" estimator
reproduces the authors' procedure instead: each batch's mean and unbiased variance, averaged over
batches in float32 (so the result depends on batch size and order; they used batches of 512).

File format (``torch.save`` of plain containers, loadable with ``torch.load(weights_only=True)``)::

    {"format": "meansparse-statistics", "version": 1,
     "meta": {str: str | int | float},            # e.g. model, data, n_images, estimator
     "placement": {...},                          # Placement.to_payload(); absent: "activations"
     "input_size": [int, ...],                    # one input's shape, e.g. [3, 32, 32]; may be absent
     "taps": [{"name": str, "kind": "function" | "module" | "robustbench" | "input" | "output" | "sum",
               "channel_dim": int, "count": int,  # positions seen per channel
               "mean": float64 tensor (C,), "std": float64 tensor (C,),
               "source": str}, ...]}                # where they come from; may be absent (older files)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, get_args

import torch
from torch import nn

from .discovery import find_taps, placement_of
from .distributed import SOLO, Group
from .files import atomic_write
from .fusion import Fused, as_rows
from .model_modes import eval_mode
from .placement_rules import ACTIVATIONS, Placement
from .routing import route_taps
from .taps import Tap, own_layers

FORMAT = "meansparse-statistics"
VERSION = 1

Progress = Callable[[int, int], None]
Estimator = Literal["exact", "authors"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)


def _batch_moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel variance (population) and mean of (A, C, B) features, in float64."""
    return torch.var_mean(rows.to(torch.float64), dim=[0, 2], correction=0)


_fused_moments = Fused(_batch_moments)


class RunningMoments:
    """Streaming per-channel count, mean and sum of squared deviations, merged exactly in float64.

    With ``keep_batches``, each batch's own moments are also kept in ``batches`` (count, mean,
    centred sum), so that the ranks of a torchrun job can hand them to rank 0, which merges them
    in a single process's order and gets its bits exactly.
    """

    def __init__(self, channels: int, keep_batches: bool = False) -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)
        self.batches: list[tuple[int, torch.Tensor, torch.Tensor]] | None = [] if keep_batches else None

    def update(self, x: torch.Tensor, channel_dim: int) -> None:
        n_b = x.numel() // max(x.shape[channel_dim], 1)
        if n_b == 0:
            return
        # Reduced on the features' own device, fused into one pass where possible (fusion.py);
        # only the per-channel results travel to the CPU.
        x = x.detach()
        view = as_rows(x, channel_dim)
        rows = view[0] if view else x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim], 1)
        var_b, mean_b = (_fused_moments if _fused_moments.worth_it(rows) else _batch_moments)(rows)
        mean_b, m2_b = mean_b.cpu(), var_b.cpu() * n_b
        if self.batches is not None:
            self.batches.append((n_b, mean_b, m2_b))
        self.add(n_b, mean_b, m2_b)

    def absorb(self, batches: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Merge other batches' (count, mean, centred sum), in order: another rank's ``batches``."""
        for n_b, mean_b, m2_b in batches:
            self.add(n_b, mean_b, m2_b)

    def add(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Merge one batch's count, mean and centred sum of squares (Chan et al.)."""
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta.square() * (n_a * n_b / n)
        self.count = n

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / max(self.count, 1)).clamp_min(0).sqrt()


@dataclass
class TapStatistics:
    """Mean and standard deviation of one tap's input, per channel."""

    tap: Tap
    mean: torch.Tensor
    std: torch.Tensor
    count: int  # positions seen per channel; 0 when unknown (statistics read from a model)
    source: str = ""  # where they come from, e.g. "BatchNorm layer1.bn" or "6 built-in photos"; "" unknown

    def __post_init__(self) -> None:
        # Refused here, once, so that no NaN can reach the operator, a chart or an exported file.
        channels = self.tap.channels
        if tuple(self.mean.shape) != (channels,) or tuple(self.std.shape) != (channels,):
            raise ValueError(f"The statistics of {self.tap.name} do not have one value per channel "
                             f"({channels} channels); recalibrate.")
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.std).all()):
            raise ValueError(f"The statistics of {self.tap.name} hold NaN or infinite values "
                             "(were the calibration images finite?); recalibrate.")
        if (self.std < 0).any():
            raise ValueError(f"The statistics of {self.tap.name} hold a negative standard deviation; recalibrate.")


@dataclass
class Statistics:
    """Statistics for every tap of a model, in forward order, plus free-form metadata."""

    taps: list[TapStatistics]
    meta: dict[str, str | int | float] = field(default_factory=dict)
    placement: Placement = ACTIVATIONS
    input_size: tuple[int, ...] | None = None  # one input's shape, to find the taps again on attaching

    def __getitem__(self, name: str) -> TapStatistics:
        for tap_stats in self.taps:
            if tap_stats.tap.name == name:
                return tap_stats
        raise KeyError(name)

    @property
    def tap_list(self) -> list[Tap]:
        return [t.tap for t in self.taps]

    def fingerprint(self) -> str:
        """A short hash of the taps and values, to key caches of results that depend on them."""
        digest = hashlib.sha256()
        for t in self.taps:
            digest.update(repr(t.tap).encode())
            digest.update(t.mean.double().cpu().numpy().tobytes())
            digest.update(t.std.double().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def to_payload(self) -> dict:
        """The file's content as plain containers (see the module docstring)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "meta": dict(self.meta),
            "placement": self.placement.to_payload(),
            **({"input_size": list(self.input_size)} if self.input_size is not None else {}),
            "taps": [
                {
                    "name": t.tap.name,
                    "kind": t.tap.kind,
                    "channel_dim": t.tap.channel_dim,
                    "channels": t.tap.channels,
                    "count": t.count,
                    "mean": t.mean.double().cpu(),
                    "std": t.std.double().cpu(),
                    **({"source": t.source} if t.source else {}),
                }
                for t in self.taps
            ],
        }

    @classmethod
    def from_payload(cls, payload: object, origin: str = "the statistics") -> "Statistics":
        """Statistics from ``to_payload``'s containers; ValueError for anything else."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{origin} is not a MeanSparse statistics file.")
        if payload.get("version") != VERSION:
            raise ValueError(
                f"{origin} has statistics format version {payload.get('version')}; "
                f"this version reads {VERSION}. Recalibrate to rebuild it."
            )
        try:
            taps = [
                TapStatistics(Tap(t["name"], t["kind"], t["channel_dim"], t["channels"]), t["mean"], t["std"], t["count"],
                              str(t.get("source", "")))
                for t in payload["taps"]
            ]
            placement = Placement.from_payload(payload["placement"]) if "placement" in payload else ACTIVATIONS
            input_size = tuple(int(n) for n in payload["input_size"]) if "input_size" in payload else None
            return cls(taps=taps, meta=dict(payload["meta"]), placement=placement, input_size=input_size)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{origin} is a damaged MeanSparse statistics file ({exc!r}); recalibrate.") from exc
        except ValueError as exc:
            raise ValueError(f"{origin}: {exc}") from exc

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically, so a reader never sees half a file."""
        payload = self.to_payload()
        atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Statistics":
        """Read a statistics file; refuses anything that is not one, with a readable message."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"{path} is not a readable MeanSparse statistics file ({exc}).") from exc
        return cls.from_payload(payload, str(path))


def _inputs_of(batch) -> torch.Tensor:
    """Accept bare tensors or (inputs, labels, ...) tuples, as DataLoaders yield them."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class AuthorsMoments:
    """The authors' estimator: each batch's mean and unbiased variance, averaged over batches.

    Kept in the features' float32 and summed in the data's order as their MeanSparse layers do it
    (``running += batch_figure / n_batches``), so the result matches the buffers their scripts write.
    ``batches`` holds each batch's (count, mean, unbiased variance); the ranks of a torchrun job
    hand theirs to rank 0, which averages them all in batch order, as one process does.
    """

    def __init__(self, channels: int) -> None:
        self.batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def update(self, x: torch.Tensor, channel_dim: int) -> None:
        dims = tuple(d for d in range(x.dim()) if d != channel_dim % x.dim())
        x = x.detach()
        n_b = x.numel() // max(x.shape[channel_dim], 1)
        self.batches.append((n_b, torch.mean(x, dim=dims).cpu(), torch.var(x, dim=dims).cpu()))

    def absorb(self, batches: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Append other batches' figures, in order: another rank's ``batches``."""
        self.batches.extend(batches)

    @property
    def count(self) -> int:
        return sum(n_b for n_b, _, _ in self.batches)

    def _averaged(self, which: int) -> torch.Tensor:
        total = torch.zeros_like(self.batches[0][which])
        for figures in self.batches:
            total += figures[which] / len(self.batches)
        return total

    @property
    def mean(self) -> torch.Tensor:
        return self._averaged(1).double()

    @property
    def std(self) -> torch.Tensor:
        # The square root their layers take, in float32: band edges then agree to the last bit.
        return torch.sqrt(self._averaged(2).clamp_min(0)).double()


def _moments(estimator: Estimator, channels: int, shared: bool) -> RunningMoments | AuthorsMoments:
    """One tap's accumulator; under torchrun the exact one also keeps its batches for rank 0's merge."""
    return AuthorsMoments(channels) if estimator == "authors" else RunningMoments(channels, keep_batches=shared)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable,
    progress: Progress | None = None,
    total: int | None = None,
    device: torch.device | str | None = None,
    meta: dict[str, str | int | float] | None = None,
    group: Group = SOLO,
    placement: str | Placement = "activations",
    estimator: Estimator = "exact",
) -> Statistics:
    """Per-channel mean and std of every tap's features over all ``batches``, model in eval mode.

    ``placement`` says where the taps are (see ``placement_rules``: "activations", "released" or a
    rule of one's own); it is stored with the statistics. ``estimator`` is "exact" (over the whole
    set, the default) or "authors" (per-batch figures averaged; give it the training set in its
    stored order in batches of 512 to reproduce their statistics). ``batches`` yields input tensors
    or (inputs, labels) pairs; ``progress(done, total)`` is called after each batch with the number
    of items seen (``total`` defaults to ``len(batches.dataset)``). The model's train/eval mode is
    restored afterwards. With a ``group`` of several ranks (torchrun), ``batches`` must be a
    sequence (``data.ItemBatches`` reads each batch when asked, so a rank reads only its share);
    each rank measures a contiguous share of it, rank 0 merges every batch's moments in order, and
    all ranks return statistics bit-identical to one process's (either estimator).
    Example::

        stats = calibrate(model, DataLoader(train_set, batch_size=256), placement="released")
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"Unknown estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}.")
    resolved = placement_of(model, placement)
    if total is None:
        total = len(getattr(batches, "dataset", ())) or 0
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shared = group.world_size > 1
    if shared:
        share = group.shard(len(batches))
        batches = map(batches.__getitem__, share)  # one at a time, where ``batches`` reads lazily
    taps: list[Tap] | None = None
    moments: dict[str, RunningMoments | AuthorsMoments] = {}

    def record(tap: Tap, x: torch.Tensor) -> torch.Tensor:
        moments[tap.name].update(x, tap.channel_dim)
        return x

    seen, input_size = 0, None
    with eval_mode(model):
        for batch in batches:
            x = _inputs_of(batch).to(device)
            if taps is None:
                taps, input_size = find_taps(model, x[:1], resolved), tuple(x.shape[1:])
                moments = {t.name: _moments(estimator, t.channels, shared) for t in taps}
            route_taps(model, taps, record, x)
            seen += x.shape[0]
            if progress is not None:
                progress(seen, max(total, seen))
    meta = {"n_images": seen, "estimator": estimator, **(meta or {})}
    if shared:
        return _merged(group, taps, moments, meta, resolved, input_size, estimator)
    if taps is None:
        raise ValueError("The calibration set is empty: give it at least one image.")
    stats = [TapStatistics(t, moments[t.name].mean, moments[t.name].std, moments[t.name].count) for t in taps]
    return Statistics(stats, meta, resolved, input_size)


def _own_taps(model: nn.Module, example: torch.Tensor | None) -> tuple[list[Tap], torch.Tensor]:
    """The model's own MeanSparse taps and the example that found them: by default a zero image,
    CIFAR-sized, else ImageNet-sized (vision transformers fix their input size)."""
    if example is not None:
        return find_taps(model, example), example
    device = next(model.parameters()).device
    for size in ((3, 32, 32), (3, 224, 224)):
        example = torch.zeros(1, *size, device=device)
        try:
            return find_taps(model, example), example
        except (RuntimeError, AssertionError):
            continue
    raise ValueError(f"{type(model).__name__} takes neither 32x32 nor 224x224 images; pass an example input.")


def published_alpha(model: nn.Module) -> float | None:
    """The threshold stored in a model's own MeanSparse layers (the alpha RobustBench evaluates it at).

    None when the model has no such layers; ValueError when its layers disagree (use
    ``published_layer_alphas`` then).
    """
    values = set(published_layer_alphas(model).values())
    if len(values) > 1:
        raise ValueError(f"The MeanSparse layers of {type(model).__name__} store {len(values)} different thresholds.")
    return values.pop() if values else None


def published_layer_alphas(model: nn.Module) -> dict[str, float]:
    """The threshold stored in each of a model's own MeanSparse layers, by layer name."""
    return {name: float(layer.threshold) for name, layer in own_layers(model).items()}


def _merged(group: Group, taps: list[Tap] | None, moments: dict[str, RunningMoments | AuthorsMoments], meta: dict,
            placement: Placement, input_size: tuple[int, ...] | None, estimator: Estimator) -> Statistics:
    """Every rank's batch moments merged on rank 0 in batch order, the result shared with all ranks."""
    shares = group.gather((taps, {name: m.batches for name, m in moments.items()}, meta["n_images"], input_size))
    payload = None
    if group.is_main:
        taps, input_size = next(((t, size) for t, _, _, size in shares if t is not None), (None, None))
        if taps is not None:
            merged = {t.name: _moments(estimator, t.channels, shared=False) for t in taps}
            for _, logs, _, _ in shares:  # rank order is batch order: shares are contiguous
                for name, log in logs.items():
                    merged[name].absorb(log)
            stats = [TapStatistics(t, merged[t.name].mean, merged[t.name].std, merged[t.name].count) for t in taps]
            meta = {**meta, "n_images": sum(n for _, _, n, _ in shares)}
            payload = Statistics(stats, meta, placement, input_size).to_payload()
    payload = group.broadcast(payload)
    if payload is None:
        raise ValueError("The calibration set is empty: give it at least one image.")
    return Statistics.from_payload(payload)


@torch.no_grad()
def embedded_statistics(model: nn.Module, example: torch.Tensor | None = None) -> Statistics:
    """Statistics stored in a model's own RobustBench MeanSparse layers (``Amini2024MeanSparse_*``).

    Those layers keep ``running_mean`` and ``running_var`` buffers; no calibration is needed. The
    standard deviation is ``torch.sqrt`` of the float32 ``running_var``, as the layers take it, so
    band edges agree with theirs to the last bit. ``example`` (one input batch) finds the layers'
    channel axes; by default a zero image the model accepts. The stored threshold goes into
    ``meta["published_alpha"]`` when all layers agree on it. The statistics attach to the model
    itself and to its base model (see ``attach``).
    """
    if not own_layers(model):
        raise ValueError(f"{type(model).__name__} has no RobustBench MeanSparse layers; calibrate it instead.")
    taps, example = _own_taps(model, example)
    layers = dict(model.named_modules())
    stats = []
    for tap in taps:
        layer = layers[tap.name.split("#")[0]]
        std = torch.sqrt(layer.running_var).double().cpu()  # exactly the layer's expression
        stats.append(TapStatistics(tap, layer.running_mean.double().cpu(), std, count=0))  # count unknown
    meta: dict[str, str | int | float] = {"source": "embedded MeanSparse layers"}
    thresholds = set(published_layer_alphas(model).values())
    if len(thresholds) == 1:
        meta["published_alpha"] = thresholds.pop()
    return Statistics(stats, meta, placement_of(model), tuple(example.shape[1:]))
