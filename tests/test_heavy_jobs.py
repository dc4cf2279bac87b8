"""Heavy work in the app goes through the server's job queue: a waiting session sees its position, its
slider and predictions do not wait, the result reaches it (and only it), and a failure is one sentence.

The queue's workers are kept busy by "another user's" jobs that wait on an event, so every state is
reached deterministically, with no sleeps.
"""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("streamlit")
from test_app import TIMEOUT, chart, check_clean, finish_jobs, open_link, start, texts  # noqa: E402

from meansparse_core import budget  # noqa: E402
from meansparse_core.budget import Cost  # noqa: E402
from meansparse_app.ui import heavy  # noqa: E402

#: A model as slow as an ImageNet one on a laptop CPU: PGD-10 takes 1 s on one image, PGD-200 20 s.
SLOW = Cost(forward_s=0.05, gradient_s=0.1, parameters=88_000_000, device="this CPU")


@pytest.fixture
def queued_attacks(monkeypatch):
    """Every attack waits in the queue, however quick (the digits model makes them all quick)."""
    monkeypatch.setattr(budget, "QUICK_S", 0.0)


@pytest.fixture
def slow_model(monkeypatch):
    """The page believes the model is ``SLOW``."""
    import meansparse_app.ui.state
    from meansparse_app import ui

    monkeypatch.setattr(ui.state, "cached_cost", lambda choice: SLOW)


@pytest.fixture
def busy_server(queued_attacks):
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
    """Square with 400 queries (in the queue: see ``queued_attacks``)."""
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


def test_a_failing_heavy_job_is_one_readable_sentence(monkeypatch, queued_attacks):
    import meansparse_app.ui.state
    from meansparse_app import ui

    def refuse(*args, **kwargs):
        raise ValueError("Square needs at least one query; raise Queries.")

    monkeypatch.setattr(ui.state, "attack_image", refuse)
    app = finish_jobs(heavy_attack(start()))
    assert [e.value for e in app.error] == ["Square needs at least one query; raise Queries."]
    assert not app.exception and "job/attack" not in app.session_state


def pgd(app, steps: int):
    next(n for n in app.number_input if n.label == "Steps").set_value(steps)
    return app.button(key="FormSubmitter:attack-Attack").click().run()


def test_a_long_pgd_on_a_slow_model_waits_in_the_queue_and_a_short_one_runs_in_the_page(slow_model):
    app = pgd(start(), 200)  # 20 s on this model: the page would hang
    check_clean(app)
    assert "job/attack" in app.session_state and "adversarial" not in app.session_state
    finish_jobs(app)
    assert app.session_state["adversarial"].choice.steps == 200
    pgd(app, 10)  # 1 s: quicker to wait for than to queue
    assert "job/attack" not in app.session_state and app.session_state["adversarial"].choice.steps == 10


def test_a_link_with_a_long_attack_on_a_slow_model_crafts_it_in_the_queue(slow_model):
    made = pgd(start(), 200)
    finish_jobs(made)
    heavy.shared_work.clear()  # else the link reads the result its maker's job left (one attack per class)
    opened = open_link(dict(made.query_params))
    check_clean(opened)
    assert "job/attack" in opened.session_state, "the link re-crafted PGD-200 in the page thread"
    finish_jobs(opened)
    assert opened.session_state["adversarial"].image.equal(made.session_state["adversarial"].image)


def test_cancel_stops_a_running_attack_and_its_progress_moves(queued_attacks):
    app = start()
    app.selectbox(key="attack_name").set_value("autoattack").run()
    next(n for n in app.number_input if n.label == "eps (/255)").set_value(0.5)  # fools nothing: its whole schedule
    app.button(key="FormSubmitter:attack-Attack").click().run()
    job = app.session_state["job/attack"]
    while job.progress == 0 and not job.finished:
        job.wait(0.05)
    assert job.state == "running" and job.progress > 0, "the attack reports its passes"
    app.button(key="cancel_job_attack").click().run()
    assert job.wait(TIMEOUT) and job.state == "cancelled"
    check_clean(app)
    assert "job/attack" not in app.session_state


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


def test_sessions_of_closed_tabs_are_kept_a_minute_at_most():
    """Each kept session holds its images, examples, sweeps and any prepared export (a whole model's weights);
    Streamlit keeps a disconnected one for 120 s by default."""
    from conftest import streamlit_config

    config = streamlit_config()
    assert 0 < config["server"]["disconnectedSessionTTL"] <= 60
