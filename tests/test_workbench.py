"""What the app and the CLI share: statistics lookup, one image attacked and compared, live accuracy, sweeps."""

from __future__ import annotations

import pytest
import torch

from meansparse_core import attach, calibrate
from meansparse_core.data import load_dataset, load_items
from meansparse_core.evaluation import EvalSettings, ResultCache, predict
from meansparse_core.models import bundled_statistics_path, find_model, load_model
from meansparse_core.statistics import Statistics
from meansparse_core.workbench import (AttackChoice, Comparison, LiveAccuracy, TopK, accuracy_table, amplified,
                                       attack_image, best_alpha, compare, find_statistics, nearest, statistics_path,
                                       top_k)

SPEC = find_model("bundled/digits-cnn")


@pytest.fixture(scope="module")
def digits():
    model = load_model(SPEC)
    sparse = attach(model, Statistics.load(bundled_statistics_path(SPEC)))
    images, labels = load_items(load_dataset("digits", "test"), range(40))
    return model, sparse, images, labels


def test_statistics_are_found_in_the_cache_first_then_with_the_bundle(tmp_path, digits):
    model = digits[0]
    found = find_statistics(SPEC, model, "digits", cache=tmp_path)
    assert "shipped with the model" in found.origin and found.stats.fingerprint() == Statistics.load(
        bundled_statistics_path(SPEC)).fingerprint()
    calibrated = calibrate(model, [torch.rand(20, 1, 8, 8)], meta={"model": SPEC.key})
    calibrated.save(statistics_path(SPEC, "digits", cache=tmp_path))
    found = find_statistics(SPEC, model, "digits", cache=tmp_path)
    assert found.origin.startswith("calibrated on 20 digits") and found.stats.fingerprint() == calibrated.fingerprint()
    # a user's checkpoint of the same architecture never gets the bundled statistics
    assert find_statistics(SPEC, model, "digits", weights_digest="abc", cache=tmp_path) is None


def test_top_k_is_the_softmax_ranking(digits):
    model, _, images, _ = digits
    top = top_k(model, images[0], SPEC.class_names, k=3)
    with torch.no_grad():
        probabilities = model(images[:1]).softmax(1)[0]
    values, indices = probabilities.topk(3)
    assert top.classes == tuple(str(i) for i in indices.tolist())
    assert top.probabilities == pytest.approx(values.tolist())


def test_verdict_names_what_the_attack_did():
    seven, one = TopK(("7", "1"), (0.9, 0.1)), TopK(("1", "7"), (0.8, 0.2))
    assert "Run an attack" in Comparison("7", 0.2, seven, seven, None, None).verdict
    assert "both models still see" in Comparison("7", 0.2, seven, seven, seven, seven).verdict
    assert "fools the base model (1) but not MeanSparse" in Comparison("7", 0.2, seven, seven, one, seven).verdict
    assert "fools MeanSparse (1) but not the base" in Comparison("7", 0.2, seven, seven, seven, one).verdict
    assert "fools both models" in Comparison("7", 0.2, seven, seven, one, one).verdict


def test_attack_on_one_image_stays_in_budget_and_targets_the_chosen_model(digits):
    _, sparse, images, labels = digits
    for target in ("base", "sparse"):
        adversarial = attack_image(sparse, images[0], int(labels[0]), AttackChoice(eps=16, steps=5, target=target),
                                   alpha=0.3)
        assert adversarial.shape == images[0].shape
        assert (adversarial - images[0]).abs().max() <= 16 / 255 + 1e-6
        assert adversarial.min() >= 0 and adversarial.max() <= 1
    comparison = compare(sparse, images[0], adversarial, int(labels[0]), 0.3, SPEC.class_names)
    assert comparison.label == SPEC.class_names[int(labels[0])] and comparison.sparse_adv is not None


def test_amplified_perturbation_fills_the_range_around_grey():
    delta = torch.tensor([[[-0.02, 0.0, 0.01]]])
    picture, scale = amplified(delta)
    assert scale == pytest.approx(25.0) and picture.min() == pytest.approx(0.0) and picture[0, 0, 1] == 0.5
    assert amplified(torch.zeros(1, 2, 2)) == (pytest.approx(torch.full((1, 2, 2), 0.5)), 1.0)


def test_live_accuracy_at_alpha_zero_is_the_base_models(digits):
    model, sparse, images, labels = digits
    live = LiveAccuracy.craft(model, images, labels, AttackChoice(eps=32, steps=5, target="base"), batch_size=16)
    clean, transfer = live.at(sparse, 0.0)
    assert clean == pytest.approx((predict(model, images) == labels).float().mean().item())
    assert transfer == pytest.approx((predict(model, live.adversarial) == labels).float().mean().item())
    assert transfer < clean
    assert live.at(sparse, 5.0)[0] < clean  # a huge band erases the features


def test_accuracy_table_rows_and_cache(tmp_path, digits):
    _, sparse, images, labels = digits
    settings = EvalSettings(attack="pgd", eps=32, steps=3, batch_size=20)
    cache = ResultCache(tmp_path)
    calls = []
    rows = accuracy_table(sparse, images, labels, settings, [0.3, 0.1], opinions=("bpda",),
                          progress=lambda done, total, what: calls.append((done, total)), cache=cache,
                          cache_key={"model": SPEC.key})
    assert [r["alpha"] for r in rows] == [0.0, 0.1, 0.3]
    assert "robust_bpda" not in rows[0] and {"clean", "robust", "robust_bpda"} <= set(rows[1])
    assert calls[-1] == (5, 5) and len(list(tmp_path.glob("*.json"))) == 5
    again = accuracy_table(sparse, images, labels, settings, [0.1, 0.3], opinions=("bpda",), cache=cache,
                           cache_key={"model": SPEC.key})
    assert again == rows


def test_best_and_nearest_alpha():
    rows = [{"alpha": 0.0, "clean": 0.9, "robust": 0.5}, {"alpha": 0.1, "clean": 0.895, "robust": 0.55},
            {"alpha": 0.2, "clean": 0.85, "robust": 0.6}]
    assert best_alpha(rows) == 0.1  # 0.2 is more robust but costs five points of clean accuracy
    assert nearest(rows, 0.16)["alpha"] == 0.2 and nearest([], 0.1) is None
