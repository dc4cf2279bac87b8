"""What the app and the CLI share: statistics lookup, one image attacked and compared, live accuracy, sweeps."""

from __future__ import annotations

import pytest
import torch

from meansparse_core import attach, calibrate
from meansparse_core.data import load_dataset, load_items
from meansparse_core.evaluation import EvalSettings, ResultCache, predict
from meansparse_core.models import bundled_statistics_path, find_model, load_model
from meansparse_core.statistics import Statistics
from meansparse_core.accuracy_table import COLUMN_LABELS, accuracy_table, best_alpha, nearest, wilson_interval, with_interval
from meansparse_core.attack_choice import AttackChoice, default_steps
from meansparse_core.live_accuracy import LiveAccuracy, LiveCurve
from meansparse_core.one_image import (Comparison, TopK, amplified, attack_image, base_predictions, compare,
                                       found_adversarial, top_k)
from meansparse_core.statistics_lookup import find_statistics, statistics_path

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
    plane = TopK(("airplane",), (1.0,))
    assert " a airplane" not in Comparison("airplane", 0.2, plane, plane, None, None).verdict


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


def test_a_slider_move_reuses_the_base_models_predictions(digits):
    """The base model's top-5 do not depend on alpha: made once, a comparison at a new alpha runs only the
    sparsified model, and says the same as one made from scratch."""
    _, sparse, images, labels = digits
    adversarial = images[1]
    base = base_predictions(sparse, images[0], adversarial, SPEC.class_names)
    calls = []
    hook = sparse.base.register_forward_hook(lambda *_: calls.append(1))  # the sparsified passes run it too
    try:
        reused = compare(sparse, images[0], adversarial, int(labels[0]), 0.3, SPEC.class_names, base=base)
        passes_reused = len(calls)
        fresh = compare(sparse, images[0], adversarial, int(labels[0]), 0.3, SPEC.class_names)
    finally:
        hook.remove()
    assert (passes_reused, len(calls) - passes_reused) == (2, 4) and reused == fresh


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


def test_the_live_curve_scores_each_alpha_once_nearest_the_slider_first(digits):
    """Figures from the curve are the live set's own; a slider move to a scored alpha (even written another
    way) costs nothing; the fill works outward from the alpha asked for last and stops once closed."""
    model, sparse, images, labels = digits
    live = LiveAccuracy.craft(model, images[:16], labels[:16], AttackChoice(eps=32, steps=2, target="base"))
    scored = []

    class Recording(LiveAccuracy):
        def at(self, sparse, alpha, layer_alphas=None):
            scored.append(alpha)
            return super().at(sparse, alpha, layer_alphas)

    curve = LiveCurve(Recording(live.images, live.labels, live.adversarial, live.attack), sparse)
    assert curve.at(0.3) == live.at(sparse, 0.3) and curve.at(0.1 * 3) == live.at(sparse, 0.3)
    assert scored == [0.3]
    curve.fill([0.0, 0.1, 0.2, 0.3, 0.4, 0.9])
    assert scored == [0.3, 0.2, 0.4, 0.1, 0.0, 0.9] and curve.scored() == 6
    assert curve.at(0.9) == live.at(sparse, 0.9) and len(scored) == 6
    curve.close()
    curve.fill([0.5, 0.6])
    assert curve.scored() == 6, "a closed curve scores no more in the background"
    assert curve.at(0.5) == live.at(sparse, 0.5), "but still answers"


def test_the_live_curve_is_kept_for_the_next_server_under_everything_it_depends_on(digits, tmp_path):
    model, sparse, images, labels = digits
    live = LiveAccuracy.craft(model, images[:16], labels[:16], AttackChoice(eps=32, steps=2, target="base"))
    first = LiveCurve(live, sparse, keep_in=tmp_path)
    first.fill([0.1, 0.2])
    again = LiveCurve(live, sparse, keep_in=tmp_path)
    assert again.scored() == 2 and again.at(0.2) == live.at(sparse, 0.2) and again.store == first.store
    per_layer = LiveCurve(live, sparse, {sparse.stats.taps[0].tap.name: 0.5}, keep_in=tmp_path)
    other_set = LiveCurve(LiveAccuracy.craft(model, images[16:32], labels[16:32], AttackChoice(eps=32, steps=2)),
                          sparse, keep_in=tmp_path)
    assert per_layer.scored() == other_set.scored() == 0, "other per-layer alphas or another live set: other figures"
    first.store.write_text("{not json")
    assert LiveCurve(live, sparse, keep_in=tmp_path).scored() == 0, "an unreadable file is scored again"


def test_accuracy_table_rows_and_cache(tmp_path, digits):
    _, sparse, images, labels = digits
    settings = EvalSettings(attack="pgd", eps=32, steps=3, batch_size=20)
    cache = ResultCache(tmp_path)
    calls = []
    rows = accuracy_table(sparse, images, labels, settings, [0.3, 0.1], opinions=("bpda",),
                          progress=lambda done, total, what: calls.append((done, total)), cache=cache,
                          cache_key={"model": SPEC.key})
    assert [r["alpha"] for r in rows] == [0.0, 0.1, 0.3]
    # At alpha 0 BPDA is the plain attack: the column repeats it instead of showing a hole (None).
    assert rows[0]["robust_bpda"] == rows[0]["robust"] and {"clean", "robust", "robust_bpda"} <= set(rows[1])
    assert all(r["worst"] == min(r["robust"], r["robust_bpda"]) for r in rows)
    assert all(COLUMN_LABELS[column] for row in rows for column in row)
    assert calls[-1] == (5, 5) and len(list(tmp_path.glob("*.json"))) == 5
    again = accuracy_table(sparse, images, labels, settings, [0.1, 0.3], opinions=("bpda",), cache=cache,
                           cache_key={"model": SPEC.key})
    assert again == rows


def test_best_and_nearest_alpha():
    rows = [{"alpha": 0.0, "clean": 0.9, "robust": 0.5}, {"alpha": 0.1, "clean": 0.895, "robust": 0.55},
            {"alpha": 0.2, "clean": 0.85, "robust": 0.6}]
    assert best_alpha(rows) == 0.1  # 0.2 is more robust but costs five points of clean accuracy
    assert nearest(rows, 0.16)["alpha"] == 0.2 and nearest([], 0.1) is None


def test_best_alpha_is_chosen_on_the_worst_case_not_on_exact_gradients():
    # The exact-gradient attack gains 2 of 200 at alpha 0.25 while BPDA loses: gradient masking, not robustness.
    rows = [{"alpha": 0.0, "clean": 0.7, "robust": 0.40, "robust_bpda": 0.40, "worst": 0.40},
            {"alpha": 0.25, "clean": 0.7, "robust": 0.41, "robust_bpda": 0.38, "worst": 0.38}]
    assert best_alpha(rows) == 0.0


@pytest.mark.parametrize("correct, n, low, high", [
    (8, 10, 0.4902, 0.9433),  # by hand: p = 0.8, centre (0.8 + 1.9208/10) / 1.38416, half-width 0.2265
    (0, 10, 0.0, 0.2775),  # not empty at 0%, unlike the normal approximation
    (2, 200, 0.00275, 0.03572),
    (200, 200, 0.98116, 1.0),
])
def test_wilson_interval_matches_the_formula_by_hand(correct, n, low, high):
    assert wilson_interval(correct, n) == pytest.approx((low, high), abs=6e-5)
    assert with_interval(correct / n, n).startswith(f"{correct / n:.0%} (")
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_attack_wording_counts_what_each_attack_uses():
    assert AttackChoice("square", steps=1000).effort == "1,000 queries"
    assert AttackChoice("pgd", steps=1).effort == "1 step" and AttackChoice("fgsm", steps=10).effort == "one step"
    assert "10" not in AttackChoice("autoattack", steps=10).description  # steps are unused there
    assert AttackChoice("pgd", eps=8).description == "pgd eps 8/255, 10 steps"
    assert "1,000 queries" in AttackChoice("square", steps=1000).not_found()
    assert default_steps("square") >= 100 and default_steps("pgd") == 10


def test_an_attack_that_finds_nothing_says_so(digits):
    _, sparse, images, labels = digits
    image, label = images[0], int(labels[0])
    nothing = AttackChoice(eps=0.0, target="base")
    assert not found_adversarial(sparse, image, attack_image(sparse, image, label, nothing), label, nothing)
    strong = AttackChoice(eps=64, steps=20, target="base")
    assert found_adversarial(sparse, image, attack_image(sparse, image, label, strong), label, strong)


def test_turns_find_the_images_meansparse_rescues_and_breaks(digits):
    model, sparse, images, labels = digits
    live = LiveAccuracy.craft(model, images, labels, AttackChoice(eps=32, steps=5, target="base"), batch_size=16,
                              indices=range(100, 140))
    assert live.indices[0] == 100 and live.choice.eps == 32
    for alpha in (0.0, 0.5):
        turns = live.turns(sparse, alpha)
        base_clean, base_adv = predict(model, images) == labels, predict(model, live.adversarial) == labels
        sparse_adv = predict(sparse.at(alpha), live.adversarial) == labels
        for i in range(len(labels)):
            assert (i in turns.rescued) == bool(base_clean[i] and not base_adv[i] and sparse_adv[i])
            assert (i in turns.broken) == bool(base_clean[i] and base_adv[i] and not sparse_adv[i])
    assert live.turns(sparse, 0.0) == type(turns)((), ())  # alpha 0 is the base model: nothing changes
