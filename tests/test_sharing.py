"""One computation per class: identical requests share one job (or one call) and read its result."""

from __future__ import annotations

import threading

import pytest

from meansparse_core.jobs import JobQueue
from meansparse_core.sharing import SharedWork


@pytest.fixture
def shared():
    queue = JobQueue(workers=1)
    yield SharedWork(queue, keep=2)
    queue.close()


class Work:
    """Counts its runs; each run waits until ``release`` is set, so tests can join it while it runs."""

    def __init__(self) -> None:
        self.runs, self.release = 0, threading.Event()

    def __call__(self, job) -> object:
        self.runs += 1
        while not self.release.wait(0.01):
            job.report(0, 1)  # where a cancelled job stops
        return object()


def test_identical_requests_join_one_job_and_share_its_result(shared):
    work = Work()
    tickets = [shared.submit(("attack", "image 3"), work, "attack") for _ in range(30)]
    work.release.set()
    assert all(t.wait(10) for t in tickets)
    assert work.runs == 1
    assert len({id(t.result()) for t in tickets}) == 1


def test_a_later_identical_request_reads_the_finished_result(shared):
    work = Work()
    work.release.set()
    first = shared.submit("key", work, "attack")
    assert first.wait(10)
    later = shared.submit("key", work, "attack")
    assert later.finished and later.result() is first.result()
    assert work.runs == 1


def test_different_keys_run_separately(shared):
    work = Work()
    work.release.set()
    tickets = [shared.submit(key, work, "attack") for key in ("image 1", "image 2")]
    assert all(t.wait(10) for t in tickets)
    assert work.runs == 2


def test_one_session_cancelling_leaves_the_job_to_the_others(shared):
    work = Work()
    mine, theirs = shared.submit("key", work, "attack"), shared.submit("key", work, "attack")
    mine.cancel()
    assert mine.finished and mine.state == "cancelled"
    work.release.set()
    assert theirs.wait(10) and theirs.state == "done"
    assert work.runs == 1


def test_the_job_stops_when_nobody_waits_and_a_new_request_starts_afresh(shared):
    work = Work()
    tickets = [shared.submit("key", work, "attack") for _ in range(2)]
    for ticket in tickets:
        ticket.cancel()
    assert tickets[0].job.wait(10) and tickets[0].job.state == "cancelled"
    again = shared.submit("key", work, "attack")
    work.release.set()
    assert again.wait(10) and again.state == "done"


def test_closed_tabs_count_as_gone(shared):
    """A ticket's alive check is its session's tab: the job stops once every waiting tab has closed."""
    work, open_tabs = Work(), [True, True]
    tickets = [shared.submit("key", work, "attack", alive=lambda tab=tab: open_tabs[tab]) for tab in range(2)]
    open_tabs[0] = False
    assert not tickets[0].job.wait(0.2)  # the other tab still waits
    open_tabs[1] = False
    assert tickets[1].wait(10) and tickets[1].state == "cancelled"


def test_a_failed_job_is_not_shared_with_later_requests(shared):
    calls = []

    def failing(job):
        calls.append(1)
        raise ValueError("no")

    first = shared.submit("key", failing, "attack")
    assert first.wait(10) and first.state == "failed"
    second = shared.submit("key", failing, "attack")
    assert second.wait(10)
    assert len(calls) == 2


def test_run_here_runs_once_per_key_for_callers_at_the_same_time(shared):
    runs, started, release = [], threading.Event(), threading.Event()

    def work():
        runs.append(1)
        started.set()
        release.wait(10)
        return object()

    results = []
    threads = [threading.Thread(target=lambda: results.append(shared.run_here("key", work))) for _ in range(5)]
    threads[0].start()
    started.wait(10)
    for thread in threads[1:]:
        thread.start()
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(runs) == 1 and len(results) == 5 and len({id(r) for r in results}) == 1


def test_only_the_newest_finished_results_are_kept(shared):
    work = Work()
    work.release.set()
    for key in ("a", "b", "c"):
        assert shared.submit(key, work, "attack").wait(10)
    assert shared.submit("a", work, "attack").wait(10)
    assert work.runs == 4  # "a" was the oldest of three with keep=2: run again
