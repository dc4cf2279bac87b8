"""Numbers at their edges: alpha 0 and huge alphas, channels with zero variance, NaN and Inf in an
input or in statistics. Each has a stated behaviour, no crash, and no NaN reaching a chart.

Operator-level cases (NaN passing through, zero-std channels never replaced) are in test_operator.py.
"""

import base64
import json
import math
from dataclasses import astuple

import numpy as np
import pytest
import torch

from meansparse_core.models import bundled_statistics_path, find_model, load_model
from meansparse_core.sparse_model import attach
from meansparse_core.probes import histogram, probe, shared_edges
from meansparse_core.statistics import Statistics, TapStatistics, calibrate
from meansparse_core.one_image import top_k

DIGITS = find_model("bundled/digits-cnn")


@pytest.fixture(scope="module")
def digits():
    model = load_model(DIGITS)
    stats = Statistics.load(bundled_statistics_path(DIGITS))
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return model, stats, attach(model, stats), images


def finite_probes(probes) -> bool:
    for p in probes:
        numbers = [p.channel_mean, p.channel_std, p.fraction_replaced_clean, p.fraction_replaced_adv, p.clean_norm,
                   *astuple(p.perturbation), *astuple(p.relative)]
        if not all(math.isfinite(v) for v in numbers):
            return False
        for sample in (p.standardized, p.channel_values):
            counts, edges = histogram(sample.clean_before, sample.edges(30))
            if not (np.isfinite(edges).all() and np.isfinite(counts).all()):
                return False
    return True


def test_alpha_zero_is_the_model_itself(digits):
    model, _, sparse, images = digits
    with torch.no_grad():
        assert torch.equal(sparse(images, alpha=0.0), model(images))


@pytest.mark.parametrize("alpha", [50.0, 1e6, float("inf")])
def test_a_huge_alpha_replaces_every_feature_by_its_mean_and_stays_finite(digits, alpha):
    model, stats, sparse, images = digits
    with torch.no_grad():
        logits = sparse(images, alpha=alpha)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, logits[:1].expand_as(logits)), "every image looks like the mean image"
    probes = probe(model, stats, images, images.flip(0), alpha=alpha)
    assert finite_probes(probes)
    assert all(p.fraction_replaced_clean == 1.0 for p in probes if (stats[p.name].std > 0).all())


@pytest.mark.parametrize("alpha", [-0.1, float("nan")])
def test_negative_or_nan_alpha_is_refused(digits, alpha):
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        digits[2](digits[3], alpha=alpha)


def test_channels_with_zero_variance_keep_everything_finite(digits):
    images = digits[3]
    dead = load_model(DIGITS)
    with torch.no_grad():
        next(m for m in dead.modules() if isinstance(m, torch.nn.Conv2d)).weight[0] = 0.0  # a constant channel
    stats = calibrate(dead, [images])
    zero = [s for s in stats.taps if (s.std == 0).any()]
    assert zero, "the dead channel has zero variance"
    sparse = attach(dead, stats)
    with torch.no_grad():
        assert torch.isfinite(sparse(images, alpha=1e6)).all()
    assert finite_probes(probe(dead, stats, images, images.flip(0), alpha=1.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_an_input_stays_in_that_image_and_out_of_the_charts(digits, bad):
    model, stats, sparse, images = digits
    broken = images.clone()
    broken[0, 0, 3, 3] = bad
    with torch.no_grad():
        logits = sparse(broken, alpha=0.5)
    assert torch.isfinite(logits[1:]).all(), "other images in the batch are unaffected"
    assert torch.equal(logits[1:], sparse(images, alpha=0.5)[1:])
    assert finite_probes(probe(model, stats, images, broken, alpha=0.5))
    assert all(math.isfinite(p) for p in top_k(sparse.at(0.5), broken[1], DIGITS.class_names).probabilities)
    with pytest.raises(ValueError, match="output for this image is NaN or infinite"):
        top_k(sparse.at(0.5), broken[0], DIGITS.class_names)


def test_histogram_edges_ignore_nan_and_inf():
    values = np.array([0.0, 1.0, np.nan, np.inf, -np.inf, 2.0])
    edges = shared_edges(values, bins=4)
    assert (edges[0], edges[-1]) == (0.0, 2.0)
    assert histogram(values, edges)[0].sum() == 3
    assert np.isfinite(shared_edges(np.array([np.nan]), bins=4)).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_statistics_with_nan_or_inf_are_refused_before_use(digits, bad):
    _, stats, _, _ = digits
    first = stats.taps[0]
    for field in ("mean", "std"):
        values = getattr(first, field).clone()
        values[0] = bad
        arguments = {"tap": first.tap, "mean": first.mean, "std": first.std, "count": first.count, field: values}
        with pytest.raises(ValueError, match="NaN or infinite values .*recalibrate"):
            TapStatistics(**arguments)
    with pytest.raises(ValueError, match="negative standard deviation"):
        TapStatistics(first.tap, first.mean, -first.std - 1, first.count)


def test_calibrating_on_images_with_nan_is_refused(digits):
    model, _, _, images = digits
    broken = images.clone()
    broken[2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values \\(were the calibration images finite\\?\\)"):
        calibrate(model, [broken])


def plotted_numbers(figure: dict) -> np.ndarray:
    """Every x and y value of a plotly figure's traces (plotly 6 sends numpy arrays base64-encoded)."""
    values = []
    for trace in figure["data"]:
        for axis in ("x", "y"):
            value = trace.get(axis)
            if isinstance(value, dict) and "bdata" in value:
                values.append(np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).astype(float))
            elif value is not None:
                values.append(np.array([v for v in np.ravel(value) if isinstance(v, (int, float))], dtype=float))
    return np.concatenate(values) if values else np.zeros(0)


def test_the_app_at_the_extremes_of_the_slider_draws_only_finite_numbers():
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file("../meansparse_app/app.py", default_timeout=120).run()
    for page in ("views/explore.py", "views/layers.py"):
        app.switch_page(page).run()
        for alpha in (0.0, 2.0):
            app.slider(key="alpha").set_value(alpha).run()
            assert not app.exception and not app.error, page
            for element in app.get("plotly_chart"):
                numbers = plotted_numbers(json.loads(element.proto.spec))  # json reads NaN and Infinity as floats
                assert numbers.size and np.isfinite(numbers).all(), (page, alpha, element.proto.id)
