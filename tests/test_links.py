"""Shareable links: a view survives the round trip, and no hostile parameter gets through or raises."""

from __future__ import annotations

import pytest

from meansparse_core.attack_choice import AttackChoice
from meansparse_core.limits import LIMITS
from ui.view_link import ViewLink, ignored_notice, link_params, parse_link

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
