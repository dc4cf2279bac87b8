"""Probes against features recomputed by hand from a tiny convolutional network."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from meansparse_core import calibrate, sparsify
from meansparse_core.probes import histogram, probe, shared_edges


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 8 * 8, 10),
    )


def images(n, seed):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def setup():
    model = make_model()
    stats = calibrate(model, [images(16, 1), images(16, 2)])
    clean = images(3, 3)
    adversarial = (clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    return model, stats, clean, adversarial


def first_tap(model, stats, x, alpha):
    """The first tap's input (conv1 output, independent of alpha) and its sparsified output."""
    with torch.no_grad():
        before = model[0](x)
    s = stats.taps[0]
    return before, sparsify(before, s.mean, s.std, alpha)


def numpy_fraction(features, mean, std, alpha):
    # float32 like the operator, so that values on the band's edge are judged the same way.
    f = features.numpy()
    shape = (1, -1, 1, 1)
    mu, band = mean.float().numpy().reshape(shape), (std.float().numpy() * np.float32(alpha)).reshape(shape)
    return np.mean(np.abs(f - mu) < band)


def rows(features):
    return features.double().numpy().reshape(len(features), -1)


def numpy_sizes(model, stats, clean, adversarial, alpha):
    """Per-image sizes of the perturbation at the first tap, by hand: (base clean norm, {size: norms})."""
    (before_clean, after_clean), (before_adv, after_adv) = (first_tap(model, stats, x, alpha) for x in (clean, adversarial))
    s = stats.taps[0]
    mu, band = s.mean.float().numpy().reshape(1, -1, 1, 1), (s.std.float().numpy() * np.float32(alpha)).reshape(1, -1, 1, 1)
    in_clean = (np.abs(before_clean.numpy() - mu) < band).reshape(len(clean), -1)
    in_adv = (np.abs(before_adv.numpy() - mu) < band).reshape(len(clean), -1)
    change, change_after = rows(before_adv) - rows(before_clean), rows(after_adv) - rows(after_clean)
    norm = lambda v: np.linalg.norm(v, axis=1)  # noqa: E731
    sizes = {
        "base": norm(change),  # at the first tap, the base and the sparsified model see the same input
        "before": norm(change), "after": norm(change_after),
        "removed": norm(np.where(in_clean & in_adv, change, 0)),
        "passed": norm(np.where(~in_clean & ~in_adv, change, 0)),
        "created": norm(np.where(in_clean != in_adv, change_after, 0)),
    }
    return norm(rows(before_clean)), sizes


def test_taps_come_in_forward_order(setup):
    model, stats, clean, adversarial = setup
    probes = probe(model, stats, clean, adversarial, alpha=0.5)
    assert [p.name for p in probes] == [t.name for t in stats.tap_list]
    assert [p.channels for p in probes] == [4, 6]


def test_alpha_zero_changes_nothing(setup):
    model, stats, clean, adversarial = setup
    for p in probe(model, stats, clean, adversarial, alpha=0.0):
        for sample in (p.standardized, p.channel_values):
            np.testing.assert_array_equal(sample.clean_after, sample.clean_before)
            np.testing.assert_array_equal(sample.adv_after, sample.adv_before)
        assert p.fraction_replaced_clean == 0.0 and p.fraction_replaced_adv == 0.0
        assert p.relative.after == p.relative.before > 0 and p.perturbation.after == p.perturbation.before > 0
        assert p.perturbation.removed == p.perturbation.created == 0.0


def test_fraction_replaced_matches_numpy_and_grows_with_alpha(setup):
    model, stats, clean, adversarial = setup
    fractions = []
    for alpha in (0.1, 0.5, 1.0):
        p0, p1 = probe(model, stats, clean, adversarial, alpha=alpha)
        s0, s1 = stats.taps
        before_clean, after_clean = first_tap(model, stats, clean, alpha)
        before_adv, after_adv = first_tap(model, stats, adversarial, alpha)
        assert p0.fraction_replaced_clean == pytest.approx(numpy_fraction(before_clean, s0.mean, s0.std, alpha))
        assert p0.fraction_replaced_adv == pytest.approx(numpy_fraction(before_adv, s0.mean, s0.std, alpha))
        # The second tap's input in the sparsified network comes from the first tap's sparsified output.
        with torch.no_grad():
            second = model[2](torch.relu(after_clean))
        assert p1.fraction_replaced_clean == pytest.approx(numpy_fraction(second, s1.mean, s1.std, alpha))
        fractions.append(p0.fraction_replaced_clean)
    assert 0 < fractions[0] < fractions[1] < fractions[2] < 1


@pytest.mark.parametrize("alpha", [0.3, 0.7, 1.5])
def test_perturbation_sizes_of_first_tap_match_numpy(setup, alpha):
    model, stats, clean, adversarial = setup
    p0 = probe(model, stats, clean, adversarial, alpha=alpha)[0]
    clean_norm, sizes = numpy_sizes(model, stats, clean, adversarial, alpha)
    assert p0.clean_norm == pytest.approx(clean_norm.mean(), rel=1e-5)
    for name, per_image in sizes.items():
        assert getattr(p0.perturbation, name) == pytest.approx(per_image.mean(), rel=1e-5, abs=1e-9), name
        # One denominator for every line: the base model's clean features.
        assert getattr(p0.relative, name) == pytest.approx((per_image / clean_norm).mean(), rel=1e-5, abs=1e-9), name
    # Every feature is removed, passed or mixed; after the operator only passed and created remain.
    assert sizes["after"] ** 2 == pytest.approx(sizes["passed"] ** 2 + sizes["created"] ** 2, rel=1e-6)
    assert p0.perturbation.removed > 0 and p0.perturbation.passed > 0 and p0.perturbation.created > 0


def test_at_the_first_tap_both_lines_start_from_the_same_perturbation(setup):
    # The old measure divided the sparsified line by the sparsified clean features' norm, which shrinks
    # as alpha grows: with MeanSparse then looked worse than without from the first tap on.
    model, stats, clean, adversarial = setup
    for alpha in (0.5, 1.0, 2.0):
        p0 = probe(model, stats, clean, adversarial, alpha=alpha)[0]
        assert p0.relative.before == pytest.approx(p0.relative.base)
        assert p0.perturbation.before == pytest.approx(p0.perturbation.base)


def test_created_change_is_at_least_the_band_edge_jump():
    # One feature, mean 0, band +-1: clean 0.9 (inside: becomes 0), adversarial 1.1 (outside: stays).
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    stats = calibrate(model, [torch.tensor([[1.0], [-1.0]])])
    assert stats.taps[0].mean.item() == 0.0
    (p,) = probe(model, stats, torch.tensor([[0.9]]), torch.tensor([[1.1]]), alpha=1.0 / stats.taps[0].std.item())
    assert p.perturbation.before == pytest.approx(0.2)
    assert p.perturbation.created == p.perturbation.after == pytest.approx(1.1)
    assert p.perturbation.removed == p.perturbation.passed == 0.0
    assert p.relative.after == pytest.approx(1.1 / 0.9)


def test_unsampled_values_are_the_features_in_order(setup):
    model, stats, clean, adversarial = setup
    p0 = probe(model, stats, clean, adversarial, alpha=0.5, channel={"1": 2})[0]
    before, after = first_tap(model, stats, clean, 0.5)
    s0 = stats.taps[0]
    mu, sd = s0.mean.numpy().reshape(1, -1, 1, 1), s0.std.numpy().reshape(1, -1, 1, 1)
    np.testing.assert_allclose(p0.standardized.clean_before, ((before.double().numpy() - mu) / sd).ravel())
    np.testing.assert_allclose(p0.standardized.clean_after, ((after.double().numpy() - mu) / sd).ravel())
    np.testing.assert_array_equal(p0.channel_values.clean_before, before[:, 2].double().numpy().ravel())
    assert (p0.channel, p0.channel_mean, p0.channel_std) == (2, s0.mean[2].item(), s0.std[2].item())
    # After the operator, values inside the band sit exactly on the mean.
    after = p0.channel_values.clean_after
    inside = np.abs(p0.channel_values.clean_before - p0.channel_mean) < 0.5 * p0.channel_std
    assert inside.any()
    np.testing.assert_allclose(after[inside], p0.channel_mean, rtol=1e-6)


def test_channel_last_features_are_read_along_the_last_axis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 3))
    tokens = lambda seed: torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(seed))
    stats = calibrate(model, [tokens(1)])
    (p,) = probe(model, stats, tokens(2), tokens(3), alpha=0.5, channel=3)
    assert p.channel_dim == 2
    with torch.no_grad():
        before = model[0](tokens(2)).double().numpy()
    s = stats.taps[0]
    np.testing.assert_allclose(p.standardized.clean_before, ((before - s.mean.numpy()) / s.std.numpy()).ravel())
    np.testing.assert_array_equal(p.channel_values.clean_before, before[..., 3].ravel())


def test_layer_alphas_override_alpha_and_unknown_names_are_refused(setup):
    model, stats, clean, adversarial = setup
    p0, p1 = probe(model, stats, clean, adversarial, alpha=0.5, layer_alphas={"3": 0.0})
    assert (p0.alpha, p1.alpha) == (0.5, 0.0)
    assert p0.fraction_replaced_clean > 0 and p1.fraction_replaced_clean == 0.0
    with pytest.raises(KeyError):
        probe(model, stats, clean, adversarial, alpha=0.5, layer_alphas={"nope": 0.1})
    with pytest.raises(ValueError):
        probe(model, stats, clean, adversarial, alpha=0.5, channel=5)  # the first tap has 4


@pytest.mark.parametrize("dead", ["one channel", "whole layer"])
def test_zero_variance_gives_no_nan_or_inf(dead):
    model = make_model()
    with torch.no_grad():
        rows = slice(0, 1) if dead == "one channel" else slice(None)
        model[0].weight[rows] = 0.0
        model[0].bias[rows] = 0.0
    stats = calibrate(model, [images(8, 1)])
    assert (stats.taps[0].std == 0).any()
    clean, adversarial = images(2, 3), images(2, 4)
    for p in probe(model, stats, clean, adversarial, alpha=0.5, channel=0):
        numbers = [p.channel_mean, p.channel_std, p.fraction_replaced_clean, p.fraction_replaced_adv, p.clean_norm,
                   *vars(p.perturbation).values(), *vars(p.relative).values()]
        assert all(math.isfinite(v) for v in numbers), (p.name, numbers)
        for array in (*p.standardized.arrays(), *p.channel_values.arrays()):
            assert array.size > 0 and np.isfinite(array).all(), p.name
    if dead == "whole layer":
        assert probe(model, stats, clean, adversarial, alpha=0.5)[0].relative.base == 0.0


def test_sampling_is_bounded_and_repeatable(setup):
    model, stats, clean, adversarial = setup
    runs = [probe(model, stats, clean, adversarial, alpha=0.5, max_values=10, seed=s) for s in (7, 7, 8)]
    for p in runs[0]:
        for array in (*p.standardized.arrays(), *p.channel_values.arrays()):
            assert len(array) == 10
    for a, b, c in zip(*runs):
        for sa, sb, sc in zip(a.standardized.arrays(), b.standardized.arrays(), c.standardized.arrays()):
            np.testing.assert_array_equal(sa, sb)
            assert not np.array_equal(sa, sc)
        np.testing.assert_array_equal(a.channel_values.clean_before, b.channel_values.clean_before)
        # Fractions are exact, not sampled: the seed cannot change them.
        assert a.fraction_replaced_clean == c.fraction_replaced_clean


def test_histogram_matches_numpy_and_shared_edges_cover_everything(setup):
    model, stats, clean, adversarial = setup
    sample = probe(model, stats, clean, adversarial, alpha=0.5)[1].standardized
    counts, edges = histogram(sample.clean_before, bins=7, range=(-1.0, 1.0))
    expected_counts, expected_edges = np.histogram(sample.clean_before, bins=7, range=(-1.0, 1.0))
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(edges, expected_edges)
    shared = sample.edges(bins=30)
    np.testing.assert_array_equal(shared, shared_edges(*sample.arrays(), bins=30))
    assert len(shared) == 31
    for array in sample.arrays():
        counts, _ = histogram(array, shared)
        assert counts.sum() == array.size  # nothing falls outside the shared range


def test_model_mode_and_weights_are_left_alone(setup):
    model, stats, clean, adversarial = setup
    model.train()
    model[2].eval()  # a mixed model gets its exact modes back
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    probe(model, stats, clean, adversarial, alpha=1.0)
    assert [m.training for m in model.modules()] == [True, True, True, False, True, True, True]
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_mismatched_shapes_are_refused(setup):
    model, stats, clean, adversarial = setup
    with pytest.raises(ValueError):
        probe(model, stats, clean, adversarial[:2], alpha=0.5)
