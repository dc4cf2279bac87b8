"""Shareable links: what a view shows, written as URL query parameters and read back with every value checked.

A link is text anybody may have written. ``parse_link`` keeps a value only when it is well formed and
in range, and names the parameters it ignored, so that the app can say so once and open the rest.
Whether a model, a test image or a layer *exists* is for the caller to check: this module knows the
syntax and the ranges, not what is on this machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Mapping, Sequence

from meansparse_core.attack_choice import AttackChoice
from meansparse_core.attacks import ATTACKS
from meansparse_core.data import DATASETS
from meansparse_core.limits import LIMITS
from meansparse_core.placement_rules import ACTIVATIONS, PLACEMENTS

#: The app's pages, by the name a link gives them.
PAGES = ("explore", "layers", "accuracy", "learn")
MAX_ALPHA = 2.0  # the slider's range
MAX_LAYER_ALPHA = 10.0  # the per-layer input's range
MAX_LAYERS = 64
MAX_LINF_EPS, MAX_L2_EPS = 64.0, 10.0  # the attack form's ranges
MAX_SEED = 2**31 - 1

DECIMALS = 6  # what a link keeps of a number: the reader rounds to it
_NUMBER = re.compile(rf"[0-9]{{1,4}}(\.[0-9]{{1,{DECIMALS}}})?")  # no sign, exponent, nan or inf: nothing to misread
_INTEGER = re.compile(r"[0-9]{1,10}")
_NAME = re.compile(r"[A-Za-z0-9_.\-/@]{1,200}")  # model keys
# Tap names: ``layer1.0:relu`` (a call made in a module's forward), ``x:add``, ``1#2`` (a repeated call).
_LAYER = re.compile(r"[A-Za-z0-9_.\-/@:#]{1,200}")


@dataclass(frozen=True)
class ViewLink:
    """What a link restores; None (or empty) where the link says nothing."""

    page: str | None = None
    model: str | None = None
    data: str | None = None
    image: int | None = None  # index into the test split
    alpha: float | None = None
    compare_alpha: float | None = None  # the second alpha of the side-by-side view
    layer_alphas: tuple[tuple[str, float], ...] = ()
    layer: str | None = None  # the tap open on the Layers page
    placement: str | None = None  # where the operator goes (a key of ``PLACEMENTS``)
    attack: AttackChoice | None = None  # re-crafted with its seed when the link is opened
    presentation: bool = False


def link_params(view: ViewLink) -> dict[str, str]:
    """The query parameters of a view (only what it sets), in a stable order."""
    params = {"page": view.page, "model": view.model, "data": view.data,
              "image": None if view.image is None else str(view.image),
              "alpha": _number(view.alpha), "alpha2": _number(view.compare_alpha),
              "layer_alphas": ",".join(f"{name}:{_number(value)}" for name, value in view.layer_alphas) or None,
              "layer": view.layer, "placement": None if view.placement == ACTIVATIONS.name else view.placement,
              "layout": "presentation" if view.presentation else None}
    if view.attack is not None:
        a = view.attack
        params.update(attack=a.attack, eps=_number(a.eps), steps=str(a.steps), seed=str(a.seed), target=a.target,
                      grad=a.grad, targeted="1" if a.targeted else "0")
    return {key: value for key, value in params.items() if value is not None}


def parse_link(params: Mapping[str, str | Sequence[str]]) -> tuple[ViewLink, list[str]]:
    """The view a link's parameters describe, and the names of the parameters that were ignored.

    A parameter given twice, too long, malformed or out of range is ignored; so is one this app
    does not know. Nothing here raises on any input.
    """
    values: dict[str, str] = {}
    ignored: list[str] = []
    for name, value in params.items():
        if isinstance(value, str):
            value = [value]
        if name in PARAMETERS and len(value) == 1 and isinstance(value[0], str) and len(value[0]) <= 2000:
            values[name] = value[0].strip()
        else:
            ignored.append(_printable(name))
    found = {}
    for name, value in values.items():
        parsed = PARAMETERS[name](value)
        if parsed is None:
            ignored.append(name)
        elif name not in ATTACK_PARAMETERS:
            found[FIELD_OF.get(name, name)] = parsed
    attack, attack_ignored = _attack(values)
    ignored += attack_ignored
    return ViewLink(**found, attack=attack), ignored


def ignored_notice(ignored: Sequence[str]) -> str | None:
    """One sentence naming what a link's reader ignored; None when nothing was."""
    if not ignored:
        return None
    shown = ", ".join(dict.fromkeys(ignored[:6]))
    more = f" and {len(ignored) - 6} more" if len(ignored) > 6 else ""
    return (f"This link's {shown}{more} could not be used (unknown, malformed or out of range) and "
            "{} ignored; the rest of the view is restored.".format("was" if len(ignored) == 1 else "were"))


# --- one reader per parameter: the value, or None when it is not acceptable ---------------------


def _number(value: float | None) -> str | None:
    """A number as the reader takes it: plain decimals, never an exponent (``f"{5e-05:g}"`` is ``5e-05``)."""
    if value is None:
        return None
    return f"{round(value, DECIMALS):.{DECIMALS}f}".rstrip("0").rstrip(".")


def _float_in(low: float, high: float):
    def read(text: str) -> float | None:
        if not _NUMBER.fullmatch(text):
            return None
        value = round(float(text), DECIMALS)
        return value if low <= value <= high else None
    return read


def _integer_in(low: int, high: int):
    def read(text: str) -> int | None:
        return int(text) if _INTEGER.fullmatch(text) and low <= int(text) <= high else None
    return read


def _one_of(*choices: str):
    return lambda text: text if text in choices else None


def _matching(pattern: re.Pattern):
    return lambda text: text if pattern.fullmatch(text) else None


def _layer_alphas(text: str) -> tuple[tuple[str, float], ...] | None:
    """"name:0.3,name:0.5": every entry must be good, or the whole parameter is ignored."""
    entries = [e for e in text.split(",") if e]
    if not entries or len(entries) > MAX_LAYERS:
        return None
    read_alpha = _float_in(0.0, MAX_LAYER_ALPHA)
    pairs = {}
    for entry in entries:
        name, _, value = entry.rpartition(":")
        alpha = read_alpha(value)
        if not _LAYER.fullmatch(name) or alpha is None:
            return None
        pairs[name] = alpha
    return tuple(pairs.items())


def _flag(text: str) -> bool | None:
    return {"1": True, "true": True, "0": False, "false": False}.get(text.lower())


def _printable(name: str) -> str:
    """A parameter name fit to show back to the user: short, plain ASCII."""
    return re.sub(r"[^A-Za-z0-9_\-]", "?", str(name)[:30]) or "?"


PARAMETERS = {
    "page": _one_of(*PAGES),
    "model": _matching(_NAME),
    "data": _one_of(*DATASETS),
    "image": _integer_in(0, 10**9),
    "alpha": _float_in(0.0, MAX_ALPHA),
    "alpha2": _float_in(0.0, MAX_ALPHA),
    "layer_alphas": _layer_alphas,
    "layer": _matching(_LAYER),
    "placement": _one_of(*PLACEMENTS),
    "layout": lambda text: True if text == "presentation" else None,
    # the attack, read together by _attack
    "attack": _one_of(*ATTACKS),
    "eps": _float_in(0.0, MAX_LINF_EPS),
    "steps": _integer_in(1, LIMITS.square_queries),
    "seed": _integer_in(0, MAX_SEED),
    "target": _one_of("base", "sparse"),
    "grad": _one_of("exact", "straight-through"),
    "targeted": _flag,
}
ATTACK_PARAMETERS = ("attack", "eps", "steps", "seed", "target", "grad", "targeted")
FIELD_OF = {"alpha2": "compare_alpha", "layout": "presentation"}
assert {FIELD_OF.get(p, p) for p in PARAMETERS if p not in ATTACK_PARAMETERS} <= {f.name for f in fields(ViewLink)}


def _attack(values: Mapping[str, str]) -> tuple[AttackChoice | None, list[str]]:
    """The attack settings, checked against the chosen attack's own limits; none without ``attack``."""
    given = {name: PARAMETERS[name](values[name]) for name in ATTACK_PARAMETERS if name in values}
    if given.get("attack") is None:
        return None, [name for name, value in given.items() if name != "attack" and value is not None]
    attack = given["attack"]
    limits = {"eps": MAX_L2_EPS if attack == "pgd-l2" else MAX_LINF_EPS, "steps": LIMITS.steps_for(attack)}
    ignored = [name for name, value in given.items()
               if name in limits and value is not None and value > limits[name]]
    settings = {name: value for name, value in given.items()
                if name != "attack" and value is not None and name not in ignored}
    return AttackChoice(attack=attack, **settings), ignored
