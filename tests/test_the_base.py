"""'The base model' is one thing everywhere: on a model that carries its own MeanSparse layers (the
published ``Amini2024MeanSparse_*`` models), those layers switched off, never the model called as it is
(which runs them at their stored threshold)."""

from __future__ import annotations

import pytest
import torch

from meansparse_core import attach
from meansparse_core.attack_choice import AttackChoice
from meansparse_core.data import load_dataset, load_items
from meansparse_core.evaluation import predict
from meansparse_core.live_accuracy import LiveAccuracy
from meansparse_core.one_image import found_adversarial
from meansparse_core.statistics import embedded_statistics

#: A stored threshold high enough that the released model, called as it is, disagrees with its base on
#: most images (at 1.5 the digits model changes 3 predictions in 200, at 3 it changes 180).
HIGH_THRESHOLD = 3.0


@pytest.fixture
def released(released_digits):
    """(released model, its SparseModel, test images, labels, the base's and the released model's predictions)."""
    model = released_digits(HIGH_THRESHOLD)
    images, labels = load_items(load_dataset("digits", "test"), range(60))
    sparse = attach(model, embedded_statistics(model, images[:1]))
    base_says, released_says = predict(sparse.base, images), predict(model, images)
    assert (base_says != released_says).any(), "the stored threshold must change some predictions"
    return model, sparse, images, labels, base_says, released_says


def test_an_image_the_base_model_gets_right_is_not_adversarial_against_it(released):
    """Before: judged with the model as called (its layers at the stored threshold), an unchanged image
    'fooled the base model' wherever that model disagreed with the base."""
    _, sparse, images, labels, base_says, _ = released
    choice = AttackChoice(target="base")
    for image, label, base in zip(images, labels, base_says):
        if base == label:
            assert not found_adversarial(sparse, image, image, int(label), choice)
    # Without a label, the reference is the base model's prediction on the clean image, and MeanSparse at
    # alpha 0 is the base: an unchanged image fools neither.
    for target in ("base", "sparse"):
        choice = AttackChoice(target=target)
        assert not any(found_adversarial(sparse, image, image, None, choice, alpha=0.0) for image in images[:20])


def test_at_alpha_0_meansparse_rescues_and_breaks_nothing_on_a_released_model(released):
    """Alpha 0 is the base, so no item can turn. Before: the 'base' figures came from the model as called."""
    _, sparse, images, labels, _, _ = released
    others = images.roll(1, dims=0)  # "adversarial" images: other items, which the base mostly gets wrong
    live = LiveAccuracy(images, labels, others, "test")
    turns = live.turns(sparse, 0.0)
    assert turns.rescued == () and turns.broken == ()


def test_the_wrapper_offers_the_base_and_the_model_as_given_under_distinct_names(released):
    model, sparse, images, _, _, _ = released
    with torch.no_grad():
        assert torch.equal(sparse.base(images), sparse(images, alpha=0.0))
        assert torch.equal(sparse.wrapped(images), model(images))
    assert not hasattr(sparse, "model"), "an ambiguous name for the model as given"
