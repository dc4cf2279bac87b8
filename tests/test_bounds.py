"""Bounds: the app caps what one request may ask for, a long job reports progress without holding up
other sessions, and feature capture stays within a stated memory budget however large the model."""

import threading

import numpy as np
import pytest
import torch

from meansparse_core.data import load_dataset, load_items
from meansparse_core.evaluation import EvalSettings
from meansparse_core.models import bundled_statistics_path, build_random, find_model, load_model
from meansparse_core.sparse_model import attach
from meansparse_core.probes import probe
from meansparse_core.statistics import Statistics, calibrate
from meansparse_core.accuracy_table import accuracy_table
from meansparse_core.limits import LIMITS, parse_alphas
from meansparse_core.one_image import top_k

DIGITS = find_model("bundled/digits-cnn")


def test_alphas_per_sweep_are_bounded_and_checked():
    assert parse_alphas("0.3; 0.1, 0.1 ,0.2") == (0.1, 0.2, 0.3)
    assert len(parse_alphas(", ".join(str(i / 100) for i in range(LIMITS.alphas)))) == LIMITS.alphas
    with pytest.raises(ValueError, match=f"at most {LIMITS.alphas} alphas"):
        parse_alphas(", ".join(str(i / 100) for i in range(LIMITS.alphas + 1)))
    for text in ("", "a, b", "-1", "11", "nan"):
        with pytest.raises(ValueError, match="(?i)alpha"):
            parse_alphas(text)


def test_the_app_caps_images_steps_and_queries():
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file("../meansparse_app/app.py", default_timeout=120).run()
    assert {n.label: n for n in app.number_input}["Steps"].max == LIMITS.steps
    app.selectbox(key="attack_name").set_value("square").run()
    assert {n.label: n for n in app.number_input}["Queries"].max == LIMITS.square_queries
    app.switch_page("views/accuracy.py").run()
    sweep = {n.label: n for n in app.number_input}
    assert sweep["Test images (N)"].max <= LIMITS.items and sweep["Steps"].max == LIMITS.steps
    assert sweep["Square queries"].max == LIMITS.square_queries
    assert not app.exception


def test_a_long_evaluation_reports_progress_and_does_not_hold_up_another_session():
    model = load_model(DIGITS)
    sparse = attach(model, Statistics.load(bundled_statistics_path(DIGITS)))
    images, labels = load_items(load_dataset("digits", "test"), range(200))
    reports, other_session_done = [], threading.Event()

    def progress(done, total, what):
        reports.append(done)
        if len(reports) == 3:  # mid-job: wait here until the other session has been served
            assert other_session_done.wait(60), "the other session was held up by this job"

    def other_session():
        for alpha in (0.0, 0.5, 1.0):  # what a slider move recomputes
            top_k(sparse.at(alpha), images[0], DIGITS.class_names)
            probe(model, sparse.stats, images[:1], images[1:2], alpha=alpha)
        other_session_done.set()

    job = threading.Thread(target=lambda: accuracy_table(
        sparse, images, labels, EvalSettings(attack="pgd", eps=32, steps=5, batch_size=20), [0.2, 0.4], progress=progress))
    job.start()
    while len(reports) < 3 and job.is_alive():
        threading.Event().wait(0.01)
    threading.Thread(target=other_session).start()
    job.join()
    assert other_session_done.is_set()
    assert reports == sorted(reports) and reports[-1] == 3, "monotone progress up to all three evaluations"
    assert len(reports) > 3 * 5, "progress within each evaluation, not only between them"


def test_feature_capture_of_a_large_model_stays_within_its_budget():
    """Probes keep at most 8 arrays of max_values float64 values per tap (1.28 MB at the default
    20,000): the budget does not grow with the model's feature maps, here WideResNet-28-10's."""
    model = build_random(find_model("robustbench/cifar10/Linf/Standard")).eval()
    x = torch.rand(1, 3, 32, 32)
    stats = calibrate(model, [torch.rand(4, 3, 32, 32)])
    for max_values in (20_000, 1_000):
        probes = probe(model, stats, x, x.flip(-1), alpha=0.5, max_values=max_values)
        kept = sum(a.nbytes for p in probes for s in (p.standardized, p.channel_values) for a in s.arrays())
        assert kept <= len(probes) * 8 * max_values * 8
        largest_tap = max(t.channels for t in stats.tap_list) * 32 * 32  # values of one image's biggest tap input
        assert all(s.clean_before.size <= max_values < largest_tap for p in probes for s in (p.standardized,))
        assert np.isfinite([p.fraction_replaced_adv for p in probes]).all()
