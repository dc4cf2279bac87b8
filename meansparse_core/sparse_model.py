"""The sparsified model: MeanSparse with a model's statistics at its taps, alpha chosen per call.

Example::

    sparse = attach(model, stats)
    logits = sparse(x, alpha=0.25)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import torch
from torch import nn

from . import native
from .discovery import find_taps, placement_of
from .operator import GradMode, MeanSparse
from .placement_rules import OWN_LAYERS, Placement
from .routing import Pass, Router, run_pass
from .statistics import Statistics
from .taps import Tap, own_layers


class SparseModel(nn.Module):
    """A model with MeanSparse at the taps of its statistics; alpha is chosen per call.

    The wrapped model's weights are shared, not copied, and never modified, and nothing is left on
    it between passes: it can be saved, copied or called on its own while this lives. ``detach()``
    (or leaving a ``with attach(...) as sparse:`` block) ends this wrapper: calling it then raises.
    ``base`` is the base model, the only one to predict with when the base is meant;
    ``wrapped`` is the model as given, which for a released model is not the base. Example::

        sparse = attach(model, stats)
        logits = sparse(x, alpha=0.25)
        attackable = sparse.at(alpha=0.25, grad="straight-through")   # an nn.Module for attacks
        plain = sparse.base   # the base model: alpha 0, the model's own MeanSparse layers switched off
    """

    def __init__(self, model: nn.Module, stats: Statistics) -> None:
        super().__init__()
        self.wrapped = model
        self.stats = stats
        self.taps = stats.tap_list
        self.operators = nn.ModuleList(
            MeanSparse(s.mean, s.std, s.tap.channel_dim) for s in stats.taps
        )
        self._index = {t.name: i for i, t in enumerate(self.taps)}
        self._router = Router(model)
        self._attached = True
        self._by_name = {t.name: t for t in self._router.cheapest(self.taps)}  # built once: forward runs on every slider move
        self.train(model.training)  # a fresh nn.Module says "training"; say what the model is in

    def forward(
        self,
        x: torch.Tensor,
        alpha: float,
        grad: GradMode = "exact",
        layer_alphas: Mapping[str, float] | None = None,
    ) -> torch.Tensor:
        """Logits with MeanSparse at ``alpha`` (``layer_alphas`` overrides it for named taps)."""
        if not self._attached:
            raise RuntimeError("This sparsified model was detached from its model; attach the model again "
                               "(attach(model, stats)) to use MeanSparse on it.")
        layer_alphas = layer_alphas or {}
        unknown = set(layer_alphas) - set(self._index)
        if unknown:
            raise KeyError(f"No tap named {sorted(unknown)[0]!r}; see SparseModel.taps for the names.")

        def handler(tap: Tap, features: torch.Tensor) -> torch.Tensor:
            operator = self.operators[self._index[tap.name]]
            return operator(features, layer_alphas.get(tap.name, alpha), grad)

        def relu_handler(tap: Tap, features: torch.Tensor) -> torch.Tensor | None:
            tap_alpha = layer_alphas.get(tap.name, alpha)
            # At alpha 0 the model's own call runs untouched (in place, if it says so); where the
            # kernel cannot run (a GPU), the operator and the ReLU run apart, each at its best.
            if not native.usable(features, tap.channel_dim) or not tap_alpha:
                return None
            return self.operators[self._index[tap.name]].relu(features, tap_alpha, grad)

        return run_pass(Pass(self._router, handler, self._by_name, relu_handler=relu_handler), self.wrapped, (x,), {})

    def at(self, alpha: float, grad: GradMode = "exact", layer_alphas: Mapping[str, float] | None = None) -> "FixedAlpha":
        """A light ``nn.Module`` view with these settings frozen, e.g. for torchattacks."""
        return FixedAlpha(self, alpha, grad, layer_alphas)

    @property
    def base(self) -> nn.Module:
        """The base model: the plain model, or, when it carries its own MeanSparse layers, the model
        with those layers switched off (called as it is, it runs them at their stored threshold)."""
        return self.at(0.0) if any(t.kind == "robustbench" for t in self.taps) else self.wrapped

    def detach(self) -> nn.Module:
        """End this wrapper (calling it afterwards raises) and return the untouched original model."""
        self._attached = False
        return self.wrapped

    def __enter__(self) -> "SparseModel":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


class FixedAlpha(nn.Module):
    """A ``SparseModel`` with alpha, gradient mode and per-layer alphas fixed: ``forward(x)``."""

    def __init__(self, sparse: SparseModel, alpha: float, grad: GradMode, layer_alphas: Mapping[str, float] | None) -> None:
        super().__init__()
        self.sparse = sparse
        self.alpha = float(alpha)
        self.grad = grad
        self.layer_alphas = dict(layer_alphas or {})
        self.train(sparse.training)  # mirror the wrapped model's mode instead of nn.Module's default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparse(x, self.alpha, self.grad, self.layer_alphas)


def _example(model: nn.Module, stats: Statistics) -> torch.Tensor:
    return torch.zeros(1, *stats.input_size, device=next(model.parameters()).device)


def _onto(model: nn.Module, stats: Statistics) -> Statistics:
    """``stats`` for ``model``'s taps: a released model's layers mapped onto its base model's
    ``released`` taps (in forward order, channel counts checked), other statistics checked as they are."""
    if stats.input_size is None:
        return stats  # written before files recorded the input size: nothing to run the check on
    released_layers = stats.taps and all(t.tap.kind == "robustbench" for t in stats.taps)
    if released_layers and not own_layers(model):
        taps = find_taps(model, _example(model, stats), "released")
        if [t.channels for t in taps] != [t.tap.channels for t in stats.taps]:
            raise ValueError(
                f"These statistics come from {len(stats.taps)} MeanSparse layers, but the released placement of "
                f"{type(model).__name__} has {len(taps)} taps with other widths; is this model their base model?")
        return replace(stats, taps=[replace(s, tap=t) for s, t in zip(stats.taps, taps)],
                       placement=placement_of(model, "released"))
    taps = find_taps(model, _example(model, stats), stats.placement)
    if taps != stats.tap_list:
        raise ValueError(f"These statistics were computed at other places than the {stats.placement.label} placement "
                         f"puts in {type(model).__name__} ({len(stats.taps)} taps, here {len(taps)}); recalibrate "
                         "for this model.")
    return stats


def attach(model: nn.Module, stats: Statistics, placement: str | Placement | None = None) -> SparseModel:
    """Put MeanSparse with ``stats`` at the taps of ``model`` that the statistics were computed for.

    Statistics read from a released model (``embedded_statistics``) attach to its base model too: the
    library maps the released layers onto the base's ``released`` taps. ``placement``, when given,
    must be the one the statistics were computed with. Anything that does not fit raises ValueError
    before a hook is installed.
    """
    if placement is not None and placement_of(model, placement) != stats.placement and not (
            stats.placement == OWN_LAYERS and placement_of(model, placement).name == "released"):
        raise ValueError(f"These statistics were computed with the {stats.placement.label} placement, not "
                         f"{placement_of(model, placement).label}; calibrate with that placement or pick "
                         f"{stats.placement.name}.")
    return SparseModel(model, _onto(model, stats))
