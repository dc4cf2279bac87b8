"""The app's server-wide caches: what a calibration forgets, and what it must not keep."""

import pytest
import torch

from meansparse_core.statistics import calibrate
from meansparse_core.statistics_lookup import statistics_path

streamlit = pytest.importorskip("streamlit")


@pytest.fixture
def loaders():
    from meansparse_app.ui import loaders

    for cached in (loaders.cached_model, loaders.cached_statistics, loaders.cached_sparse, loaders.cached_live_set,
                   loaders.cached_live_curve):
        cached.clear()
    yield loaders
    for cached in (loaders.cached_statistics, loaders.cached_sparse, loaders.cached_live_curve):
        cached.clear()


def test_a_calibration_forgets_only_what_it_replaces_and_the_live_figures_follow_it(loaders):
    """New statistics for one (model, data, placement): its sparsified model and live figures are new ones;
    every other cached model stays as it was (other sessions keep working on it)."""
    digits = loaders.ModelChoice("bundled/digits-cnn", "", None, "cpu")
    other = loaders.ModelChoice("bundled/cifar-resnet9", "", None, "cpu")
    kept = loaders.cached_sparse(other, "cifar10", "activations")
    before = loaders.cached_sparse(digits, "digits", "activations")

    def live_figures(sparse):
        return loaders.cached_live_curve(digits, "digits", "", 32.0, "activations", sparse.stats.fingerprint()).at(0.8)

    old_figures = live_figures(before)
    model = loaders.cached_model(digits)
    # Statistics far from the shipped ones (random images): the live figures at alpha 0.8 move.
    new = calibrate(model, [torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 4])
    new.save(statistics_path(digits.spec, "digits"))
    loaders.forget_statistics(digits, "digits", "activations")

    after = loaders.cached_sparse(digits, "digits", "activations")
    assert after is not before and after.stats.fingerprint() == new.fingerprint()
    assert loaders.cached_sparse(other, "cifar10", "activations") is kept
    live = loaders.cached_live_set(digits, "digits", "", 32.0, "activations")
    assert live_figures(after) == live.at(after, 0.8, {}) != old_figures
