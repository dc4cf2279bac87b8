"""One queue for the heavy work of a server that a whole class shares.

AutoAttack, long Square runs, accuracy sweeps and calibrations take seconds to minutes of CPU. Run
in the thread that draws a user's page, several of them at once would each take every core and
every slider move in the room would wait behind them. Here they wait in one first-in first-out
queue instead, with a bounded number running at once (``workers``), each limited to
``threads_per_job`` torch threads, and cores left over for the light work (a slider move, top-5)
that never enters the queue. Example::

    queue = JobQueue.for_this_machine()
    job = queue.submit(lambda job: sweep(progress=job.report), "accuracy sweep", alive=session_is_open)
    job.position   # 1 while it is next in line, None once it runs
    job.wait(); job.result()  # the sweep's rows, or the sweep's exception raised again

A job's handle is the only way to its result: the queue lists no jobs, so whoever holds the handle
(the session that submitted it) is the only one who sees the result. A job stops at its next
progress report once cancelled or once ``alive()`` says its submitter went away, so long work
reports often (attacks do at every forward pass: ``attacks.make_attack(..., progress=job.report)``).
A waiting job whose submitter went away leaves the line as soon as anyone asks for a position. One
``owner`` (a browser session) has at most ``per_owner`` jobs waiting or running.

Torch threads: ``torch.set_num_threads`` sets the OpenMP thread count of the *calling* thread, and
also a process-wide count that threads started later read the first time they run an operator.
Each worker sets its own count, then puts the process-wide count back from a short-lived helper
thread, so the threads a web server starts later for its pages keep every core. Workers never call
``torch.compile`` (``fusion.eager_in_this_thread``; eager results are the same): compiled kernels
are guarded on the thread count, and a worker compiled copies of its own (logged as "GLOBAL_STATE
changed: num_threads"), seconds of pure-Python work holding the interpreter lock at low priority
while every page of the server waits for the lock.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import traceback
from collections import deque
from typing import Callable, Generic, Hashable, Literal, TypeVar

import torch

from meansparse_core.fusion import eager_in_this_thread

log = logging.getLogger(__name__)
T = TypeVar("T")
State = Literal["queued", "running", "done", "failed", "cancelled"]


class JobCancelled(Exception):
    """Raised inside a job (by ``Job.report``) and by ``Job.result`` once the job was cancelled."""


class TooManyJobs(ValueError):
    """Raised by ``JobQueue.submit`` when the submitter already has ``per_owner`` jobs waiting or running."""


class Job(Generic[T]):
    """One piece of heavy work: where it stands, how far it got, and (when finished) its outcome."""

    def __init__(self, queue: "JobQueue", work: Callable[["Job[T]"], T], description: str,
                 alive: Callable[[], bool], owner: Hashable | None = None) -> None:
        self.description = description
        self.owner = owner
        self.state: State = "queued"
        self.progress = 0.0  # fraction done, as the job last reported it
        self.message = ""
        self._queue = queue
        # Dropped when the job ends: the work's closure holds models, images and a page's setup.
        self._work: Callable[["Job[T]"], T] | None = work
        self._alive: Callable[[], bool] | None = alive
        self._cancelled, self._finished = threading.Event(), threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None

    @property
    def position(self) -> int | None:
        """1 for the next job to run, 2 for the one after it...; None once it runs or ended."""
        return self._queue.position(self)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def wanted(self) -> bool:
        """False once cancelled, ended, or once its submitter went away: then it is not worth running on."""
        alive = self._alive
        return not self._cancelled.is_set() and alive is not None and alive()

    def report(self, done: float, total: float, message: str = "") -> None:
        """Record progress (``done`` of ``total``); raises ``JobCancelled`` when nobody wants the job any more.

        Jobs pass it as their progress callback, so that a cancelled job stops at its next report.
        """
        self.progress = min(max(done / total, 0.0), 1.0) if total else 0.0
        self.message = message
        if not self.wanted:
            raise JobCancelled(f"{self.description} was cancelled.")

    def cancel(self) -> None:
        """Drop the job if it waits; stop it at its next progress report if it runs."""
        self._cancelled.set()
        self._queue.discard(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ended (True) or ``timeout`` seconds passed (False)."""
        return self._finished.wait(timeout)

    def result(self) -> T:
        """The job's return value; its exception raised again if it failed."""
        if not self.finished:
            raise RuntimeError(f"{self.description} has not finished yet; check Job.finished first.")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def _run(self) -> None:
        """Run the work and end the job, whatever happens: nothing it raises reaches the worker."""
        try:
            if not self.wanted:
                raise JobCancelled(f"{self.description} was cancelled.")
            self.state = "running"
            log.info("%s: running", self.description)
            result = self._work(self)
        except JobCancelled as exc:
            return self._end("cancelled", exc)
        except BaseException as exc:  # noqa: BLE001 - handed to the submitter, who shows it; the worker goes on
            # The traceback goes to the log only, as text: its frames hold everything the work held.
            log.warning("%s failed:\n%s", self.description, "".join(traceback.format_exception(exc)).rstrip())
            return self._end("failed", exc)
        self._result = result
        self._end("done")

    def _end(self, state: State, error: BaseException | None = None) -> None:
        log.info("%s: %s%s", self.description, state, f" ({error})" if error else "")
        # Nothing of the work stays: neither its closure nor the frames of the error's traceback.
        self._error, self.state = error.with_traceback(None) if error else None, state
        self._work = self._alive = None
        if state == "done":
            self.progress = 1.0
        self._queue._ended(self)
        self._finished.set()


#: Serialises the thread-count dance of ``use_torch_threads`` between workers starting together.
_THREADS_LOCK = threading.Lock()


def use_torch_threads(count: int) -> None:
    """Limit the calling thread's torch operators to ``count`` threads, leaving other threads' counts alone."""
    with _THREADS_LOCK:
        # The first call also fixes this thread's count from the process-wide one, which would
        # otherwise happen at its first operator and undo the line below.
        process_default = torch.get_num_threads()
        torch.set_num_threads(count)
        if count != process_default:
            helper = threading.Thread(target=_set_process_threads, args=(process_default,), name="torch-threads")
            helper.start()
            helper.join()


def _set_process_threads(count: int) -> None:
    torch.get_num_threads()
    torch.set_num_threads(count)


#: The niceness of the workers' threads: when cores are short, a page's rerun goes first.
JOB_NICENESS = 10


def yield_to_pages() -> None:
    """Lower the calling thread's CPU priority (Linux schedules threads one by one; threads it starts inherit it)."""
    if sys.platform == "linux":
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(current, JOB_NICENESS))


def as_background_work(work: Callable[[], None], threads: int = 1) -> None:
    """Run ``work`` in the calling thread as the server's workers run jobs: ``threads`` torch threads, lower
    CPU priority than the pages, eager operators."""
    use_torch_threads(threads)
    yield_to_pages()
    with eager_in_this_thread():
        work()


#: Background work still running, and how to stop each: torch code still running in a daemon thread
#: when the interpreter ends aborts the process ("terminate called without an active exception").
_BACKGROUND: dict[threading.Thread, Callable[[], None]] = {}


def start_in_background(work: Callable[[], None], stop: Callable[[], None], name: str) -> threading.Thread:
    """``work`` on a daemon thread of its own, as background work (see ``as_background_work``); ``stop()``
    must make it return soon: it is called when the interpreter exits."""

    def run() -> None:
        try:
            as_background_work(work)
        finally:
            _BACKGROUND.pop(threading.current_thread(), None)

    thread = threading.Thread(target=run, name=name, daemon=True)
    _BACKGROUND[thread] = stop
    thread.start()
    return thread


@atexit.register
def stop_background_work() -> None:
    """Stop every piece of background work and wait for each to end (at exit: see ``_BACKGROUND``)."""
    for stop in list(_BACKGROUND.values()):
        stop()
    for thread in list(_BACKGROUND):
        thread.join(timeout=30)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class JobQueue:
    """A first-in first-out queue of heavy jobs, run by ``workers`` threads of ``threads_per_job`` torch threads each."""

    def __init__(self, workers: int = 1, threads_per_job: int = 1, per_owner: int = 3) -> None:
        if workers < 1 or threads_per_job < 1 or per_owner < 1:
            raise ValueError("A job queue needs at least one worker, one thread per job and one job per owner.")
        self.workers, self.threads_per_job, self.per_owner = workers, threads_per_job, per_owner
        self._waiting: deque[Job] = deque()
        self._changed = threading.Condition()
        self._running = 0
        self._unfinished: dict[Hashable, int] = {}  # per owner: jobs submitted and not yet ended
        self._closed = False
        self._threads = [threading.Thread(target=self._serve, name=f"heavy-job-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    @classmethod
    def for_this_machine(cls, cores: int | None = None) -> "JobQueue":
        """Sized to the cores: a quarter of them (at least one) stay free for slider moves, and the rest
        run jobs of at most four threads each. Two cores give one job at a time, on one thread."""
        cores = cores or usable_cores()
        heavy = max(1, cores - max(1, cores // 4))
        workers = -(-heavy // 4)
        return cls(workers=workers, threads_per_job=heavy // workers)

    def submit(self, work: Callable[[Job[T]], T], description: str = "job",
               alive: Callable[[], bool] = lambda: True, owner: Hashable | None = None) -> Job[T]:
        """Queue ``work(job)``; ``alive()`` says whether its submitter still wants it (checked before it runs
        and at each progress report). ``owner`` (a session) may have ``per_owner`` jobs unfinished at once."""
        self._drop_unwanted()
        job = Job(self, work, description, alive, owner)
        with self._changed:
            if self._closed:
                raise RuntimeError("This job queue is closed.")
            if owner is not None:
                if self._unfinished.get(owner, 0) >= self.per_owner:
                    raise TooManyJobs(f"You already have {self.per_owner} heavy jobs waiting or running on this "
                                      "server: wait for one to end, or cancel one, before starting another.")
                self._unfinished[owner] = self._unfinished.get(owner, 0) + 1
            self._waiting.append(job)
            position = len(self._waiting)
            self._changed.notify()
        # Not ``position()``: that drops unwanted jobs, and a submitter may make this one wanted only after
        # this returns (``sharing.SharedWork`` adds the first ticket then).
        log.info("%s: queued at position %d", description, position)
        return job

    def _ended(self, job: Job) -> None:
        """Called by a job as it ends: its owner may submit another."""
        if job.owner is None:
            return
        with self._changed:
            left = self._unfinished.pop(job.owner, 1) - 1
            if left:
                self._unfinished[job.owner] = left

    def position(self, job: Job) -> int | None:
        """1 for the next job to run...; None once it runs or ended. Jobs nobody wants any more leave the line first."""
        self._drop_unwanted()
        with self._changed:
            return self._waiting.index(job) + 1 if job in self._waiting else None

    def _drop_unwanted(self) -> None:
        """End the waiting jobs whose submitter went away (a closed tab), so that they neither wait nor count."""
        with self._changed:
            waiting = list(self._waiting)
        for job in waiting:
            try:
                wanted = job.wanted
            except Exception:  # noqa: BLE001 - a failing check is the worker's to report, when the job's turn comes
                continue
            if not wanted:
                self.discard(job)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    def discard(self, job: Job) -> None:
        """Take a waiting job out of the line, ending it as cancelled; a running one is left to stop itself."""
        with self._changed:
            if job not in self._waiting:
                return
            self._waiting.remove(job)
        job._end("cancelled", JobCancelled(f"{job.description} was cancelled."))

    def close(self) -> None:
        """Cancel what waits, let running jobs end, and stop the workers."""
        with self._changed:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            self._changed.notify_all()
        for job in waiting:
            job._end("cancelled", JobCancelled(f"{job.description} was cancelled: the server is stopping."))
        for thread in self._threads:
            thread.join()

    def _serve(self) -> None:
        as_background_work(self._run_jobs, self.threads_per_job)

    def _run_jobs(self) -> None:
        while True:
            with self._changed:
                while not self._waiting and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                self._running += 1
            try:
                job._run()
            finally:
                with self._changed:
                    self._running -= 1
