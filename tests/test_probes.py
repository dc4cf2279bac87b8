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


def numpy_attenuation(f_clean, f_adv):
    c = f_clean.double().numpy().reshape(len(f_clean), -1)
    a = f_adv.double().numpy().reshape(len(f_adv), -1)
    return np.mean(np.linalg.norm(a - c, axis=1) / np.linalg.norm(c, axis=1))


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
        assert p.fraction_clamped_clean == 0.0 and p.fraction_clamped_adv == 0.0
        assert p.attenuation_sparse == p.attenuation_base > 0


def test_fraction_clamped_matches_numpy_and_grows_with_alpha(setup):
    model, stats, clean, adversarial = setup
    fractions = []
    for alpha in (0.1, 0.5, 1.0):
        p0, p1 = probe(model, stats, clean, adversarial, alpha=alpha)
        s0, s1 = stats.taps
        before_clean, after_clean = first_tap(model, stats, clean, alpha)
        before_adv, after_adv = first_tap(model, stats, adversarial, alpha)
        assert p0.fraction_clamped_clean == pytest.approx(numpy_fraction(before_clean, s0.mean, s0.std, alpha))
        assert p0.fraction_clamped_adv == pytest.approx(numpy_fraction(before_adv, s0.mean, s0.std, alpha))
        # The second tap's input in the sparsified network comes from the first tap's sparsified output.
        with torch.no_grad():
            second = model[2](torch.relu(after_clean))
        assert p1.fraction_clamped_clean == pytest.approx(numpy_fraction(second, s1.mean, s1.std, alpha))
        fractions.append(p0.fraction_clamped_clean)
    assert 0 < fractions[0] < fractions[1] < fractions[2] < 1


def test_attenuation_of_first_tap_matches_numpy(setup):
    model, stats, clean, adversarial = setup
    p0 = probe(model, stats, clean, adversarial, alpha=0.7)[0]
    before_clean, after_clean = first_tap(model, stats, clean, 0.7)
    before_adv, after_adv = first_tap(model, stats, adversarial, 0.7)
    assert p0.attenuation_base == pytest.approx(numpy_attenuation(before_clean, before_adv), rel=1e-5)
    assert p0.attenuation_sparse == pytest.approx(numpy_attenuation(after_clean, after_adv), rel=1e-5)
    assert p0.attenuation_sparse != pytest.approx(p0.attenuation_base)


def test_identical_inputs_give_zero_attenuation(setup):
    model, stats, clean, _ = setup
    for p in probe(model, stats, clean, clean.clone(), alpha=0.5):
        assert p.attenuation_base == 0.0 and p.attenuation_sparse == 0.0
        assert p.fraction_clamped_clean == p.fraction_clamped_adv > 0


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
    assert p0.fraction_clamped_clean > 0 and p1.fraction_clamped_clean == 0.0
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
        numbers = [p.channel_mean, p.channel_std, p.fraction_clamped_clean, p.fraction_clamped_adv,
                   p.attenuation_base, p.attenuation_sparse]
        assert all(math.isfinite(v) for v in numbers), (p.name, numbers)
        for array in (*p.standardized.arrays(), *p.channel_values.arrays()):
            assert array.size > 0 and np.isfinite(array).all(), p.name
    if dead == "whole layer":
        assert probe(model, stats, clean, adversarial, alpha=0.5)[0].attenuation_base == 0.0


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
        assert a.fraction_clamped_clean == c.fraction_clamped_clean


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
