"""Finding taps: which places of a model a placement puts MeanSparse in, from one forward pass.

Where it goes is a placement rule (``placement_rules.py``); what a tap is, ``taps.py``. Models that
already contain RobustBench ``MeanSparse`` layers (``Amini2024MeanSparse_*``) keep exactly those
layers as their taps, driven by our alpha instead of their stored threshold.
"""

from __future__ import annotations

import torch
from torch import nn

from .model_modes import eval_mode
from .placement_rules import OWN_LAYERS, Placement, name_matches, resolve
from .routing import discover
from .taps import Tap, module_part, own_layers


def placement_of(model: nn.Module, placement: "str | Placement" = "activations") -> Placement:
    """The placement ``find_taps`` applies to ``model``: its own MeanSparse layers if it has any.

    A model that carries the authors' layers is tapped at exactly those layers (they are its released
    placement), under ``activations`` and ``released`` alike; a rule of one's own is refused there.
    """
    if own_layers(model):
        if isinstance(placement, str) and placement in ("activations", "released") or placement == OWN_LAYERS:
            return OWN_LAYERS
        raise ValueError(f"{type(model).__name__} carries its own MeanSparse layers, which are its taps; apply a rule "
                         "of your own to a model without them (e.g. its base model).")
    return resolve(placement, model)


def _unmatched_rule(placement: Placement, taps: list[Tap]) -> str | None:
    """The first rule of ``placement`` that put no tap anywhere, as text."""
    suffix = {"input": ":input", "output": ":output", "additions": ":add"}
    for rule in placement.rules:
        if not any(t.name.split("#")[0] == f"{module_part(t.name)}{suffix[rule.where]}"
                   and name_matches(rule.pattern, module_part(t.name)) for t in taps):
            return f"{rule.pattern}:{rule.where}"
    return None


@torch.no_grad()
def find_taps(model: nn.Module, example: torch.Tensor, placement: "str | Placement" = "activations") -> list[Tap]:
    """List the taps of ``model`` in forward order, from one forward pass on ``example`` (eval mode).

    ``placement`` is a name from ``placement_rules.PLACEMENTS`` ("activations", "released"), a rule's
    text (e.g. ``"layer.*.block.*:output"``) or a ``Placement``; see ``placement_of``.
    """
    placement = placement_of(model, placement)
    with eval_mode(model):
        found, module_names = discover(model, example, placement)
    if placement == OWN_LAYERS:
        return [t for t in found if t.kind == "robustbench"]
    taps = [t for t in found if t.kind in ("input", "output", "sum")
            or placement.activations and not placement.skips(module_part(t.name))]
    if (rule := _unmatched_rule(placement, taps)) is not None:
        example_names = ", ".join(module_names[1:4])
        raise ValueError(f"The rule {rule!r} matches no module of {type(model).__name__} (its modules are named like "
                         f"{example_names}); check the pattern.")
    if not taps:
        raise ValueError(
            f"No activation found in {type(model).__name__}: MeanSparse sits in front of "
            "activations such as ReLU, SiLU or GELU."
        )
    return taps

