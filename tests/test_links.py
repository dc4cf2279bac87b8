"""Shareable links: a view survives the round trip, and no hostile parameter gets through or raises."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from meansparse_core import find_taps
from meansparse_core.attack_choice import AttackChoice
from meansparse_core.limits import LIMITS
from meansparse_core.models import find_model, load_model
from meansparse_core.robustbench_compat import import_robustbench
from meansparse_app.ui.view_link import DECIMALS, MAX_ALPHA, MAX_LAYER_ALPHA, MAX_LINF_EPS, ViewLink, ignored_notice, link_params, parse_link

FULL = ViewLink(page="layers", model="bundled/cifar10-resnet", data="cifar10", image=17, alpha=0.45,
                compare_alpha=0.0, layer_alphas=(("3", 0.5), ("8.body.2", 1.25)), layer="8.body.2",
                placement="released",
                attack=AttackChoice("apgd-ce", 8.0, 20, "sparse", "straight-through", True, 7), presentation=True)


def test_a_view_survives_the_round_trip():
    assert parse_link(link_params(FULL)) == (FULL, [])
    assert parse_link(link_params(ViewLink())) == (ViewLink(), [])


def test_a_plain_link_restores_page_image_and_alpha():
    view, ignored = parse_link({"alpha": "0.45", "image": "17", "page": "layers"})
    assert (view.alpha, view.image, view.page, ignored) == (0.45, 17, "layers", [])


def test_only_what_is_set_is_written():
    assert link_params(ViewLink(alpha=0.0)) == {"alpha": "0"}
    assert link_params(ViewLink(placement="activations")) == {}  # the default placement
    assert "layout" not in link_params(ViewLink(presentation=False))


@pytest.mark.parametrize("name, value", [
    ("alpha", "nan"), ("alpha", "inf"), ("alpha", "-0.1"), ("alpha", "2.01"), ("alpha", "1e309"), ("alpha", "0x1"),
    ("alpha", "٠.٥"), ("alpha", ""), ("alpha", "0.5; drop table"), ("alpha", "9" * 5000),
    ("alpha2", "-1"), ("image", "-3"), ("image", "1.5"), ("image", "١٧"), ("image", "99999999999999999999"),
    ("page", "../../etc/passwd"), ("page", "Layers<script>"), ("model", "bundled/x y"), ("model", "a" * 300),
    ("data", "cifar10\x00"), ("data", "mnist"), ("layer", "<img src=x onerror=alert(1)>"), ("placement", "Ü"),
    ("placement", "before-activations"),
    ("layout", "projector"), ("layer_alphas", "3:0.5,8:nan"), ("layer_alphas", ",".join(f"l{i}:1" for i in range(65))),
    ("layer_alphas", "3:11"), ("layer_alphas", ":0.5"), ("layer_alphas", "3"),
    ("attack", "rm -rf"), ("__proto__", "1"), ("<script>alert(1)</script>", "x"),
])
def test_a_bad_value_is_ignored_and_named(name, value):
    view, ignored = parse_link({name: value, "image": "4"} if name != "image" else {name: value})
    assert len(ignored) == 1 and "<" not in ignored[0] and len(ignored[0]) <= 30
    assert view == (ViewLink(image=4) if name != "image" else ViewLink())


def test_a_parameter_given_twice_or_not_as_text_is_ignored():
    view, ignored = parse_link({"alpha": ["0.1", "0.9"], "image": [3], "page": ["explore"]})
    assert view == ViewLink(page="explore") and sorted(ignored) == ["alpha", "image"]


def test_attack_settings_are_checked_against_the_chosen_attack():
    view, ignored = parse_link({"attack": "pgd", "steps": str(LIMITS.steps + 1), "eps": "16", "seed": "3"})
    assert view.attack == AttackChoice("pgd", 16.0, AttackChoice().steps, seed=3) and ignored == ["steps"]
    view, ignored = parse_link({"attack": "square", "steps": str(LIMITS.square_queries)})
    assert view.attack.steps == LIMITS.square_queries and not ignored
    view, ignored = parse_link({"attack": "pgd-l2", "eps": "32"})
    assert view.attack.eps == AttackChoice().eps and ignored == ["eps"]


def test_attack_settings_without_an_attack_are_ignored():
    view, ignored = parse_link({"eps": "8", "seed": "1", "alpha": "0.3"})
    assert view == ViewLink(alpha=0.3) and sorted(ignored) == ["eps", "seed"]
    view, ignored = parse_link({"attack": "nope", "eps": "8"})
    assert view.attack is None and sorted(ignored) == ["attack", "eps"]


def test_the_notice_is_one_sentence_that_names_a_few():
    assert ignored_notice([]) is None
    assert "alpha could not be used" in ignored_notice(["alpha"]) and " was ignored" in ignored_notice(["alpha"])
    many = ignored_notice([f"p{i}" for i in range(20)])
    assert "p5" in many and "p6" not in many and "14 more" in many and many.count(".") == 1


def real_tap_names() -> list[str]:
    """Tap names of real architectures under both placements: module taps (``layer.0.block.0.relu_0``),
    functional calls and repeats (``layer1.0:relu#2``), outputs (``layer.0.block.0:output``), additions
    (``layer1.0:add``) and the demo models' numbered layers (``8.body.2``)."""
    import_robustbench()
    from robustbench.model_zoo.architectures import dm_wide_resnet
    from robustbench.model_zoo.architectures.resnet import ResNet18

    x = torch.rand(1, 3, 32, 32)
    wrn = dm_wide_resnet.DMWideResNet(num_classes=10, depth=10, width=1, activation_fn=nn.SiLU).eval()
    resnet = ResNet18().eval()
    cifar = load_model(find_model("bundled/cifar-resnet9"))
    found = [find_taps(model, x, placement) for model in (wrn, resnet) for placement in ("activations", "released")]
    found += [find_taps(resnet, x, "activations, layer1.*:additions"), find_taps(cifar, x)]
    return sorted({t.name for taps in found for t in taps})


TAP_NAMES = real_tap_names()


def test_the_real_names_have_every_kind_of_tap_name():
    assert {":relu#2", ":output", ":add", "#"} <= {part for name in TAP_NAMES
                                                   for part in (":relu#2", ":output", ":add", "#") if part in name}


def at_link_precision(high: float):
    """Values a link can carry: rounded to its decimals, in range (the reader rounds, so these survive)."""
    return st.floats(0, high).map(lambda v: min(round(v, DECIMALS), high))


@settings(max_examples=200, deadline=None)
@given(layer=st.sampled_from(TAP_NAMES), alpha=at_link_precision(MAX_ALPHA),
       overrides=st.lists(st.tuples(st.sampled_from(TAP_NAMES), at_link_precision(MAX_LAYER_ALPHA)),
                          max_size=5, unique_by=lambda pair: pair[0]),
       eps=at_link_precision(MAX_LINF_EPS))
def test_every_real_tap_name_and_value_survives_the_round_trip(layer, alpha, overrides, eps):
    """A link reads back what it wrote: tap names with ``:`` and ``#``, and small values (``5e-05``)."""
    view = ViewLink(alpha=alpha, compare_alpha=alpha, layer=layer, layer_alphas=tuple(overrides),
                    attack=AttackChoice("pgd", eps, 10))
    assert parse_link(link_params(view)) == (view, [])


def test_small_values_are_written_without_an_exponent():
    params = link_params(ViewLink(alpha=5e-05, layer_alphas=(("layer1.0:relu#2", 1e-06),)))
    assert params == {"alpha": "0.00005", "layer_alphas": "layer1.0:relu#2:0.000001"}
    assert parse_link(params)[0].alpha == 5e-05
