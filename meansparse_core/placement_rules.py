"""Where MeanSparse goes: placement rules as data, chosen when statistics are computed and stored with them.

Two named placements (``PLACEMENTS``):

- ``activations``: in front of every activation function (ReLU, SiLU, GELU, ...), whether it is called
  as a module or as a function. This is what the paper's text describes; it works on any model.
- ``released``: where the authors' released models (RobustBench's ``Amini2024MeanSparse_*`` entries)
  have their MeanSparse layers. Those differ per architecture family, so ``released`` is looked up
  in ``RELEASED``, one entry per family, like RobustBench's model zoo: supporting a new architecture
  is adding an entry.

A rule of one's own is written as text: comma-separated ``PATTERN:WHERE`` items, where PATTERN matches
module names (``*`` stands for one name, ``**`` for any run of names) and WHERE is ``input`` or
``output`` of the module, or ``additions``: the result of every tensor addition made in the module's
own forward (a residual sum that no module returns on its own). The item ``activations`` adds the
activations rule. Example: ``"activations, layer.*.block.*:output"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Literal, get_args

from torch import nn

Where = Literal["input", "output", "additions"]
WHERE: tuple[str, ...] = get_args(Where)


@lru_cache(maxsize=None)
def _pattern(glob: str) -> re.Pattern:
    """A module-name glob as a regex: ``*`` is one name, ``**`` any run of names (or none)."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**.", i):
            out.append(r"(?:.*\.)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(r".*")
            i += 2
        elif glob[i] == "*":
            out.append(r"[^.]*")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out))


def name_matches(glob: str, module_name: str) -> bool:
    """True when ``glob`` matches the whole of ``module_name``."""
    return _pattern(glob).fullmatch(module_name) is not None


@dataclass(frozen=True)
class TapRule:
    """Operators at the ``where`` of every module whose name matches ``pattern``."""

    pattern: str
    where: Where

    def __post_init__(self) -> None:
        if self.where not in WHERE:
            raise ValueError(f"A rule puts the operator at {', '.join(WHERE)} of a module, not {self.where!r}.")


@dataclass(frozen=True)
class Placement:
    """A named rule that decides where operators go.

    ``activations``: tap every activation's input; ``skip``: leave out the activations called by
    modules whose names match these patterns; ``rules``: more taps. ``family`` names the released
    architecture a ``released`` placement was resolved for.
    """

    name: str
    activations: bool = True
    skip: tuple[str, ...] = ()
    rules: tuple[TapRule, ...] = ()
    family: str = ""

    def to_payload(self) -> dict:
        return {"name": self.name, "family": self.family, "activations": self.activations,
                "skip": list(self.skip), "rules": [[r.pattern, r.where] for r in self.rules]}

    @classmethod
    def from_payload(cls, payload: dict) -> "Placement":
        return cls(str(payload["name"]), bool(payload["activations"]), tuple(payload["skip"]),
                   tuple(TapRule(p, w) for p, w in payload["rules"]), str(payload.get("family", "")))

    @property
    def label(self) -> str:
        return f"{self.name} ({self.family})" if self.family else self.name

    def skips(self, module_name: str) -> bool:
        return any(name_matches(p, module_name) for p in self.skip)


@dataclass(frozen=True)
class ReleasedFamily:
    """Where the authors' released models of one architecture family put the operator."""

    family: str
    classes: tuple[str, ...]  # class names of a (sub)module that identify the family
    placement: Placement = field(repr=False)


ACTIVATIONS = Placement("activations")

#: One line per named placement, for pickers and help texts.
PLACEMENTS: dict[str, str] = {
    "activations": "in front of every activation function: the paper's text, works on any model",
    "released": "where the authors' released models put it: before activations and on residual sums, "
                "per architecture family",
}


def _released(family: str, skip: tuple[str, ...] = (), rules: tuple[TapRule, ...] = ()) -> Placement:
    return Placement("released", True, skip, rules, family)


# Each entry was derived by building the released model and its base entry from RobustBench 1.1.1
# with random weights and comparing them layer by layer (tests/test_released_parity.py checks it).
RELEASED: tuple[ReleasedFamily, ...] = (
    # Amini2024MeanSparse_S-WRN-94-16, _S-WRN-70-16 (CIFAR-10 L2, CIFAR-100 Linf) and _Ra_WRN_70_16
    # mirror DMWideResNet / RaWRN bases: before each activation and after every residual addition
    # (a block's output); RaWRN's squeeze-excitation ReLUs and any `last_activation` are left alone.
    ReleasedFamily("WRN", ("DMWideResNet", "NormalizedWideResNet"),
                   _released("WRN", skip=("**.se.**", "**.last_activation"),
                             rules=(TapRule("**.block.*", "output"),))),
    # No released model uses it: the WRN pattern carried over to pre-activation ResNets, whose
    # blocks likewise end with the residual addition.
    ReleasedFamily("PreAct ResNet", ("DMPreActResNet", "PreActResNet"),
                   _released("PreAct ResNet", rules=(TapRule("layer*.*", "output"),))),
    # No released model uses it: in a post-activation ResNet every residual sum feeds an
    # activation, so the activations rule already puts an operator after it.
    ReleasedFamily("ResNet", ("ResNet",), _released("ResNet")),
    # Amini2024MeanSparse_ConvNeXt-L: before each GELU and on each residual branch after drop_path.
    ReleasedFamily("ConvNeXt", ("ConvNeXt",),
                   _released("ConvNeXt", rules=(TapRule("**.blocks.*.drop_path", "output"),))),
    # Amini2024MeanSparse_Swin-L: fc1 output (the GELU's input), fc2 output, and after both
    # residual additions of every block.
    ReleasedFamily("Swin", ("SwinTransformer",),
                   _released("Swin", rules=(TapRule("**.mlp.fc2", "output"), TapRule("**.blocks.*", "additions")))),
)

#: The placement of a model that carries its own MeanSparse layers: those layers are its taps.
OWN_LAYERS = Placement("released", activations=False, family="the model's own MeanSparse layers")


def released_for(model: nn.Module) -> Placement:
    """The ``released`` placement of ``model``'s architecture family; ValueError if none is known."""
    classes = {type(m).__name__ for m in model.modules()}
    for entry in RELEASED:
        if classes.intersection(entry.classes):
            return entry.placement
    families = ", ".join(e.family for e in RELEASED)
    raise ValueError(f"No released placement is known for {type(model).__name__} (known families: {families}); "
                     "use the 'activations' placement or a rule of your own.")


def parse_rule(text: str) -> Placement:
    """A user's placement from text such as ``"activations, layer.*.block.*:output"``."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"Give a placement: {', '.join(PLACEMENTS)}, or rules such as 'layer.*.block.*:output'.")
    rules = []
    for item in items:
        if item == "activations":
            continue
        pattern, sep, where = item.rpartition(":")
        if not sep or not pattern or where not in WHERE:
            raise ValueError(f"Unknown placement {item!r}: use {', '.join(PLACEMENTS)}, or rules such as "
                             f"'layer.*.block.*:output' (where is one of {', '.join(WHERE)}).")
        rules.append(TapRule(pattern, where))  # type: ignore[arg-type]
    return Placement(text.strip(), "activations" in items, (), tuple(rules))


def resolve(placement: "str | Placement", model: nn.Module) -> Placement:
    """The placement to apply to ``model``: a name from ``PLACEMENTS``, a rule's text, or a ``Placement``."""
    if isinstance(placement, Placement):
        return released_for(model) if placement.name == "released" and not placement.family else placement
    if placement == "activations":
        return ACTIVATIONS
    if placement == "released":
        return released_for(model)
    return parse_rule(placement)


def same_taps_rule(a: Placement, b: Placement) -> bool:
    """True when two placements put operators at the same places (names aside)."""
    return replace(a, name="") == replace(b, name="")
