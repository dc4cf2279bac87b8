"""Heavy work in the app goes through the server's job queue: a waiting session sees its position, its
slider and predictions do not wait, the result reaches it (and only it), and a failure is one sentence.

The queue's workers are kept busy by "another user's" jobs that wait on an event, so every state is
reached deterministically, with no sleeps.
"""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("streamlit")
from test_app import TIMEOUT, chart, check_clean, finish_jobs, start, texts  # noqa: E402

from ui import heavy  # noqa: E402


@pytest.fixture
def busy_server():
    """Every worker of the server's queue busy with another session's job until the test ends."""
    queue = heavy.job_queue()
    release = threading.Event()
    started = [threading.Event() for _ in range(queue.workers)]
    for event in started:
        queue.submit(lambda job, event=event: event.set() or release.wait(TIMEOUT), "another user's sweep")
    assert all(event.wait(TIMEOUT) for event in started)
    yield release
    release.set()


def heavy_attack(app):
    """Square with 400 queries: heavy by ``AttackChoice.heavy``, yet quick on the digits model."""
    app.selectbox(key="attack_name").set_value("square").run()
    next(n for n in app.number_input if n.label == "Queries").set_value(400)
    return app.button(key="FormSubmitter:attack-Attack").click().run()


def test_a_heavy_attack_waits_with_its_position_while_the_slider_keeps_working(busy_server):
    app = heavy_attack(start())
    check_clean(app)
    assert "queued, position 1" in texts(app)
    assert len(chart(app, "predictions")["data"]) == 2, "no adversarial predictions while it waits"
    before = chart(app, "predictions")["data"]
    app.slider(key="alpha").set_value(1.2).run()  # answered at once, the queue still blocked
    check_clean(app)
    assert "alpha 1.2" in texts(app) and "queued, position 1" in texts(app)
    assert chart(app, "predictions")["data"][1]["x"] != before[1]["x"]
    busy_server.set()
    finish_jobs(app)
    check_clean(app)
    assert "queued" not in texts(app)
    assert "Adversarial example: square eps 32/255" in texts(app)
    assert len(chart(app, "predictions")["data"]) == 4


def test_a_second_session_waits_behind_the_first_and_results_stay_with_their_sessions(busy_server):
    first, second = heavy_attack(start()), start()
    [b for b in second.button if (b.key or "").startswith("pick_")][1].click().run()  # another image
    heavy_attack(second)
    assert "queued, position 1" in texts(first) and "queued, position 2" in texts(second)
    busy_server.set()
    finish_jobs(first)
    finish_jobs(second)
    ours, theirs = first.session_state["adversarial"], second.session_state["adversarial"]
    assert ours.for_key[1] == first.session_state["picked"].key != theirs.for_key[1]
    assert theirs.for_key[1] == second.session_state["picked"].key


def test_pressing_attack_again_with_the_same_settings_keeps_the_place_in_line(busy_server):
    app = heavy_attack(start())
    job = app.session_state["job/attack"]
    app.button(key="FormSubmitter:attack-Attack").click().run()
    assert app.session_state["job/attack"] is job and job.position == 1


def test_a_waiting_job_can_be_cancelled(busy_server):
    app = heavy_attack(start())
    job = app.session_state["job/attack"]
    app.button(key="cancel_job_attack").click().run()
    check_clean(app)
    assert job.state == "cancelled" and "job/attack" not in app.session_state
    assert "queued" not in texts(app) and "Press Attack" in texts(app)


def test_picking_another_image_cancels_the_attack_waiting_for_the_old_one(busy_server):
    app = heavy_attack(start())
    job = app.session_state["job/attack"]
    [b for b in app.button if (b.key or "").startswith("pick_")][2].click().run()
    assert job.state == "cancelled" and "queued" not in texts(app)


def test_a_failing_heavy_job_is_one_readable_sentence(monkeypatch):
    import ui.state

    def refuse(*args, **kwargs):
        raise ValueError("Square needs at least one query; raise Queries.")

    monkeypatch.setattr(ui.state, "attack_image", refuse)
    app = finish_jobs(heavy_attack(start()))
    assert [e.value for e in app.error] == ["Square needs at least one query; raise Queries."]
    assert not app.exception and "job/attack" not in app.session_state


def test_the_server_skips_the_full_garbage_collection_after_every_script_run():
    """Streamlit's default collects after every run, every poll of a queued job included: with torch loaded
    that held the interpreter lock long enough to stall every session (BENCHMARKS.md, B9)."""
    from conftest import streamlit_config

    config = streamlit_config()
    assert config["runner"]["postScriptGC"] is False


def test_the_server_watches_no_files():
    """With the README's `.venv` inside the project, Streamlit's default watcher turned every file opened there
    into an event: the server spent 14 processor-seconds in 36 s re-walking the tree (BENCHMARKS.md, B14)."""
    from conftest import streamlit_config

    config = streamlit_config()
    assert config["server"]["fileWatcherType"] == "none"
