"""The heavy-job queue: order, positions, progress, results to their submitter only, errors, cancellation,
and torch threads. Threads are synchronised with events, never with sleeps."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from meansparse_core.attacks import make_attack
from meansparse_core.data import load_dataset, load_items
from meansparse_core.jobs import JOB_NICENESS, JobCancelled, JobQueue, TooManyJobs
from meansparse_core.models import find_model, load_model

WAIT = 60  # seconds: only a hang ever waits this long


@pytest.fixture
def queue():
    queue = JobQueue(workers=1, threads_per_job=1)
    yield queue
    queue.close()


def blocker(queue: JobQueue):
    """A running job that holds the worker until ``release`` is set."""
    started, release = threading.Event(), threading.Event()

    def work(job):
        started.set()
        assert release.wait(WAIT)
        return "blocker"

    job = queue.submit(work, "blocker")
    assert started.wait(WAIT)
    return job, release


def finished(job):
    assert job.wait(WAIT), f"{job.description} did not finish"
    return job


def test_jobs_wait_in_line_with_their_positions_and_run_in_order(queue):
    running, release = blocker(queue)
    order = []
    jobs = [queue.submit(lambda job, i=i: order.append(i) or i, f"job {i}") for i in range(3)]
    assert running.state == "running" and running.position is None
    assert [j.position for j in jobs] == [1, 2, 3] and [j.state for j in jobs] == ["queued"] * 3
    assert queue.running == 1 and queue.waiting == 3
    release.set()
    assert [finished(j).result() for j in jobs] == [0, 1, 2] and order == [0, 1, 2]
    assert finished(running).result() == "blocker" and all(j.position is None for j in jobs)


def test_positions_move_up_when_a_waiting_job_is_cancelled(queue):
    _, release = blocker(queue)
    first, second, third = (queue.submit(lambda job: None, name) for name in ("first", "second", "third"))
    second.cancel()
    assert (first.position, second.position, third.position) == (1, None, 2)
    assert second.finished and second.state == "cancelled"
    with pytest.raises(JobCancelled):
        second.result()
    release.set()
    assert finished(third).state == "done"


def test_each_submitter_gets_its_own_result_from_jobs_running_at_once():
    queue = JobQueue(workers=3, threads_per_job=1)
    barrier = threading.Barrier(3, timeout=WAIT)  # all three run at the same moment

    def work(job, session):
        barrier.wait()
        return f"result of {session}"

    try:
        jobs = {s: queue.submit(lambda job, s=s: work(job, s), f"job of {s}") for s in ("ann", "bob", "cy")}
        assert {s: finished(j).result() for s, j in jobs.items()} == {s: f"result of {s}" for s in jobs}
    finally:
        queue.close()


def test_a_failing_job_hands_its_exception_to_the_submitter_and_the_queue_goes_on(queue):
    def fail(job):
        raise ValueError("Give at least one alpha.")

    failed = finished(queue.submit(fail, "bad sweep"))
    assert failed.state == "failed"
    with pytest.raises(ValueError, match="at least one alpha"):
        failed.result()
    assert finished(queue.submit(lambda job: 42)).result() == 42


def test_progress_reports_reach_the_handle(queue):
    reported, release = threading.Event(), threading.Event()

    def work(job):
        job.report(3, 12, "evaluation 4 of 12")
        reported.set()
        assert release.wait(WAIT)
        return "rows"

    job = queue.submit(work, "sweep")
    assert reported.wait(WAIT)
    assert (job.progress, job.message, job.state) == (0.25, "evaluation 4 of 12", "running")
    release.set()
    assert finished(job).progress == 1.0


def test_a_running_job_stops_at_its_next_report_once_cancelled(queue):
    reported, cancelled = threading.Event(), threading.Event()
    steps = []

    def work(job):
        for step in range(5):
            job.report(step, 5)
            steps.append(step)
            reported.set()
            assert cancelled.wait(WAIT)

    job = queue.submit(work, "long attack")
    assert reported.wait(WAIT)
    job.cancel()
    cancelled.set()
    assert finished(job).state == "cancelled" and steps == [0]


def test_a_job_whose_submitter_went_away_is_skipped_or_stopped(queue):
    _, release = blocker(queue)
    open_sessions = {"gone", "here"}
    alive = {s: (lambda s=s: s in open_sessions) for s in open_sessions}
    ran = []
    skipped = queue.submit(lambda job: ran.append("gone"), "job of a closed tab", alive["gone"])
    kept = queue.submit(lambda job: ran.append("here"), "job of an open tab", alive["here"])
    open_sessions.discard("gone")
    release.set()
    assert finished(skipped).state == "cancelled" and finished(kept).state == "done" and ran == ["here"]


def test_result_before_the_end_is_an_error(queue):
    _, release = blocker(queue)
    job = queue.submit(lambda job: 1)
    with pytest.raises(RuntimeError, match="not finished"):
        job.result()
    release.set()
    finished(job)


def test_close_cancels_what_waits_and_lets_the_running_job_end():
    queue = JobQueue()
    running, release = blocker(queue)
    waiting = queue.submit(lambda job: 1, "waiting")
    closing = threading.Thread(target=queue.close)
    closing.start()
    assert finished(waiting).state == "cancelled"
    release.set()
    closing.join()
    assert finished(running).state == "done"
    with pytest.raises(RuntimeError, match="closed"):
        queue.submit(lambda job: 1)


def in_new_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_jobs_use_their_thread_count_and_threads_started_later_keep_the_process_default():
    default = in_new_thread(torch.get_num_threads)
    queue = JobQueue(workers=1, threads_per_job=max(1, default - 1) if default > 1 else 2)
    try:
        inside = finished(queue.submit(lambda job: torch.get_num_threads())).result()
        assert inside == queue.threads_per_job
        assert in_new_thread(torch.get_num_threads) == default  # a page's thread, started after the workers
        assert torch.get_num_threads() == default
    finally:
        queue.close()


@pytest.mark.parametrize("cores, workers, threads", [(1, 1, 1), (2, 1, 1), (4, 1, 3), (8, 2, 3), (16, 3, 4)])
def test_the_machine_sized_queue_leaves_cores_for_slider_moves(cores, workers, threads):
    queue = JobQueue.for_this_machine(cores)
    try:
        assert (queue.workers, queue.threads_per_job) == (workers, threads)
    finally:
        queue.close()


def test_a_queue_needs_workers():
    with pytest.raises(ValueError, match="at least one worker"):
        JobQueue(workers=0)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are Linux's")
def test_jobs_run_at_a_lower_cpu_priority_than_the_pages():
    def niceness():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    queue = JobQueue()
    try:
        assert finished(queue.submit(lambda job: niceness())).result() >= JOB_NICENESS
        assert in_new_thread(niceness) == os.getpriority(os.PRIO_PROCESS, 0)  # a page's thread keeps the process's
    finally:
        queue.close()


def test_jobs_run_the_operator_eagerly_so_a_worker_compiles_no_kernel_of_its_own(queue):
    """A compiled kernel is guarded on the thread count, which differs in a worker: it would recompile
    there (pure-Python work holding the interpreter lock at low priority while the pages wait)."""
    from meansparse_core.fusion import MIN_ELEMENTS, Fused

    fused, x = Fused(torch.neg), torch.zeros(MIN_ELEMENTS)
    assert fused.worth_it(x) or not fused.enabled  # outside a worker this tensor takes the compiled kernel
    assert finished(queue.submit(lambda job: fused.worth_it(x), "operator")).result() is False


class Interrupted(BaseException):
    """Not an ``Exception``: what a worker that catches only those would die of."""


def test_a_worker_survives_a_failing_check_of_its_submitter_and_ends_the_job(queue):
    _, release = blocker(queue)
    session_store_gone = threading.Event()

    def alive():
        if session_store_gone.is_set():
            raise Interrupted("the session store went away")
        return True

    broken = queue.submit(lambda job: "never", "job of a vanished session", alive)
    session_store_gone.set()
    release.set()  # the worker checks the submitter as the job's turn comes
    assert finished(broken).state == "failed"
    with pytest.raises(Interrupted):
        broken.result()
    assert finished(queue.submit(lambda job: 42, "next job")).result() == 42


def test_a_worker_survives_work_that_raises_more_than_an_exception(queue):
    def work(job):
        raise Interrupted("stop")

    assert finished(queue.submit(work, "odd job")).state == "failed"
    assert finished(queue.submit(lambda job: 42, "next job")).result() == 42


class Payload:
    """Stands for what a job's work holds: a model, images, a page's setup."""


@pytest.mark.parametrize("outcome", ["done", "failed", "cancelled"])
def test_an_ended_job_holds_nothing_of_its_work(queue, outcome):
    import gc
    import weakref

    payload = Payload()
    held = weakref.ref(payload)

    def work(job, payload=payload):
        if outcome == "failed":
            raise ValueError("bad")
        if outcome == "cancelled":
            job.cancel()
            job.report(0, 1)
        return None

    job = queue.submit(work, outcome, alive=lambda payload=payload: True)
    del work, payload
    assert finished(job).state == outcome
    gc.collect()
    assert held() is None, "the ended job still holds what its work and its alive check held"


def test_one_owner_cannot_fill_the_queue(queue):
    _, release = blocker(queue)
    mine = [queue.submit(lambda job: 1, f"mine {i}", owner="session-a") for i in range(queue.per_owner)]
    with pytest.raises(TooManyJobs, match="wait for one to end, or cancel one"):
        queue.submit(lambda job: 1, "one too many", owner="session-a")
    theirs = queue.submit(lambda job: 2, "theirs", owner="session-b")  # others are not held back
    mine[0].cancel()  # an ended job frees its place
    again = queue.submit(lambda job: 3, "mine again", owner="session-a")
    release.set()
    assert finished(theirs).result() == 2 and finished(again).result() == 3
    assert all(finished(job).state in ("done", "cancelled") for job in mine)
    assert [queue.submit(lambda job: 4, owner="session-a") for _ in range(queue.per_owner)]  # all ended: room again


def test_a_waiting_job_of_a_closed_tab_leaves_the_line_as_soon_as_positions_are_asked(queue):
    _, release = blocker(queue)
    open_tabs = {"gone", "here"}
    gone = queue.submit(lambda job: 1, "job of a closed tab", lambda: "gone" in open_tabs)
    here = queue.submit(lambda job: 1, "job of an open tab", lambda: "here" in open_tabs)
    assert (gone.position, here.position) == (1, 2)
    open_tabs.discard("gone")
    assert here.position == 1 and gone.finished and gone.state == "cancelled"
    release.set()
    assert finished(here).state == "done"


# --- attacks running in a job report every pass and stop at the next one ------------------------------


@pytest.fixture(scope="module")
def digits():
    """The digits demo model and a test image it gets right; eps 0.25/255 never fools it, so every attack
    would run its whole schedule (AutoAttack: seconds, Square with 100,000 queries: about a minute)."""
    model = load_model(find_model("bundled/digits-cnn"))
    images, labels = load_items(load_dataset("digits", "test"), range(1))
    return model, images, labels


def attack_job(queue, digits, attack: str, alive=lambda: True):
    """Submit ``attack`` on the digits image as a job; return it, once it made some passes, with the passes seen."""
    model, images, labels = digits
    passes, running = [], threading.Event()

    def work(job):
        def progress(done, most):
            passes.append(done)
            job.report(done, most, f"{done} passes")
            if done:
                running.set()
        return make_attack(attack, model, eps=0.25, steps=100_000, progress=progress)(images, labels)

    job = queue.submit(work, attack, alive)
    assert running.wait(WAIT)
    return job, passes


@pytest.mark.parametrize("attack", ["autoattack", "square", "apgd-ce", "pgd"])
def test_cancelling_a_running_attack_stops_it_at_its_next_pass(queue, digits, attack):
    job, passes = attack_job(queue, digits, attack)
    assert job.progress > 0 and job.message.endswith(" passes")
    job.cancel()
    seen = len(passes)
    assert finished(job).state == "cancelled"
    assert len(passes) <= seen + 1, f"{len(passes) - seen} passes after the cancel"


def test_closing_the_tab_stops_a_running_attack_at_its_next_pass(queue, digits):
    tab_open = [True]
    job, passes = attack_job(queue, digits, "autoattack", alive=lambda: tab_open[0])
    tab_open[0] = False
    seen = len(passes)
    assert finished(job).state == "cancelled" and len(passes) <= seen + 1


def test_background_work_is_stopped_and_awaited_when_the_interpreter_exits():
    """Torch code still running in a daemon thread at exit aborts the process (seen after the app's tests)."""
    script = (
        "import threading, torch\n"
        "from meansparse_core.jobs import start_in_background\n"
        "stop, started = threading.Event(), threading.Event()\n"
        "def work():\n"
        "    started.set()\n"
        "    while not stop.is_set():\n"
        "        torch.randn(300, 300) @ torch.randn(300, 300)\n"
        "    print('stopped', flush=True)\n"
        "start_in_background(work, stop.set, 'busy')\n"
        "started.wait()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "stopped"), done.stderr[-2000:]
