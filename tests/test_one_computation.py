"""One computation per class: sessions asking for the same attack on the same image share one job and read
its result, so a class opening the lecturer's link costs one attack, not one per student."""

from __future__ import annotations

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from test_app import TIMEOUT, check_clean, finish_jobs, texts  # noqa: E402
from test_heavy_jobs import busy_server, queued_attacks  # noqa: E402,F401  (fixtures)

from meansparse_app.ui import heavy  # noqa: E402

#: The lecturer's link: a test image and an AutoAttack on it (the digits model, the offline default).
LINK = {"page": "explore", "image": "3", "alpha": "0.25", "attack": "autoattack", "eps": "32", "seed": "0",
        "target": "base"}


def open_link(link: dict) -> AppTest:
    app = AppTest.from_file("../meansparse_app/app.py", default_timeout=TIMEOUT)
    for key, value in link.items():
        app.query_params[key] = value
    return app.run()


def test_a_class_opening_one_link_runs_its_attack_once_and_everyone_sees_it(busy_server):
    students = [open_link(LINK) for _ in range(3)]
    assert heavy.job_queue().waiting == 1, "one attack waits in the queue, not one per student"
    assert all("queued, position 1" in texts(s) for s in students)
    busy_server.set()
    for student in students:
        finish_jobs(student)
        check_clean(student)
        assert "Adversarial example: autoattack eps 32/255" in texts(student)
    crafted = [s.session_state["adversarial"] for s in students]
    assert all(c is crafted[0] for c in crafted), "one result, read by every student"


def test_another_image_or_seed_is_another_computation(busy_server):
    students = [open_link(LINK), open_link({**LINK, "image": "4"}), open_link({**LINK, "seed": "1"})]
    assert heavy.job_queue().waiting == 3
    for student in students:
        student.session_state["job/attack"].cancel()  # not run: the point was how many waited


def test_one_student_leaving_does_not_stop_the_others_attack(busy_server):
    leaving, staying = open_link(LINK), open_link(LINK)
    [b for b in leaving.button if (b.key or "").startswith("pick_")][1].click().run()  # picks another image
    assert heavy.job_queue().waiting == 1
    busy_server.set()
    finish_jobs(staying)
    assert "Adversarial example: autoattack eps 32/255" in texts(staying)
