"""One computation per class: identical requests from many sessions share one result.

Thirty students opening the lecturer's link each ask for the same attack on the same image. Keyed by
everything that determines the result (model, statistics, image, attack and its settings, seed,
alpha), the first request runs the work and every identical one joins it: it waits for the same
job, or reads its finished result at once. Results are shared read-only; each session holds its
own ``Ticket``, so one student cancelling (or closing the tab) stops the job only when nobody else
is waiting for it. Example::

    shared = SharedWork(JobQueue.for_this_machine())
    ticket = shared.submit(("autoattack", model_id, image_key), craft, "AutoAttack on image 3", alive)
    ticket.position, ticket.progress   # the shared job's
    ticket.result()                    # once ticket.finished
    shared.run_here(key, quick_attack)  # light work, in the caller's thread, once per key
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import partial
from typing import Callable, Generic, Hashable, TypeVar

from meansparse_core.jobs import Job, JobCancelled, JobQueue

T = TypeVar("T")


class Ticket(Generic[T]):
    """One session's hold on a shared job: the job's state and result, and its own cancel."""

    def __init__(self, owner: "SharedWork", job: Job[T], alive: Callable[[], bool]) -> None:
        self.job, self._owner, self._alive = job, owner, alive
        self.cancelled = False

    def cancel(self) -> None:
        """This session no longer waits; the job stops once no session does."""
        self._owner.cancel(self)

    @property
    def wanted(self) -> bool:
        return not self.cancelled and self._alive()

    @property
    def description(self) -> str:
        return self.job.description

    @property
    def state(self) -> str:
        return "cancelled" if self.cancelled else self.job.state

    @property
    def finished(self) -> bool:
        return self.cancelled or self.job.finished

    @property
    def position(self) -> int | None:
        return None if self.cancelled else self.job.position

    @property
    def progress(self) -> float:
        return self.job.progress

    @property
    def message(self) -> str:
        return self.job.message

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished or self.job.wait(timeout)

    def result(self) -> T:
        if self.cancelled:
            raise JobCancelled(f"{self.description} was cancelled.")
        return self.job.result()


class SharedWork:
    """Requests keyed by what determines their result: one job (or one call) per key, shared by all."""

    def __init__(self, queue: JobQueue, keep: int = 64) -> None:
        self.queue, self.keep = queue, keep
        self._lock = threading.Lock()
        self._jobs: OrderedDict[Hashable, tuple[Job, list[Ticket]]] = OrderedDict()  # unfinished, or done (newest last)
        self._results: OrderedDict[Hashable, object] = OrderedDict()  # of ``run_here``
        self._running_here: dict[Hashable, threading.Lock] = {}

    def submit(self, key: Hashable, work: Callable[[Job[T]], T], description: str,
               alive: Callable[[], bool] = lambda: True, owner: Hashable | None = None) -> Ticket[T]:
        """A ticket on the job for ``key``: the one running or waiting, a finished one's result, or a new job
        (counted against ``owner``'s jobs in the queue: ``JobQueue.per_owner``)."""
        with self._lock:
            self._forget_old_jobs()
            job, tickets = self._jobs.get(key, (None, []))
            if job is None or job.state not in ("queued", "running", "done"):  # none, or it failed or stopped
                tickets = []
                job = self.queue.submit(work, description, partial(_anyone_waits, tickets), owner)
            ticket = Ticket(self, job, alive)
            tickets.append(ticket)
            self._jobs[key] = (job, tickets)
            self._jobs.move_to_end(key)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop one session's interest (``Ticket.cancel``); the job stops when no ticket wants it any more."""
        ticket.cancelled = True
        with self._lock:
            for key, (job, tickets) in list(self._jobs.items()):
                if job is ticket.job and not job.finished and not any(t.wanted for t in tickets):
                    del self._jobs[key]  # a later identical request starts afresh instead of joining a stopping job
                    job.cancel()

    def run_here(self, key: Hashable, work: Callable[[], T]) -> T:
        """``work()`` in the calling thread, once per key: a second caller waits for the first and shares its result."""
        with self._lock:
            if key in self._results:
                self._results.move_to_end(key)
                return self._results[key]  # type: ignore[return-value]
            running = self._running_here.setdefault(key, threading.Lock())
        with running:
            with self._lock:
                if key in self._results:
                    return self._results[key]  # type: ignore[return-value]
            result = work()  # raises for this caller; a later one tries again
            with self._lock:
                self._results[key] = result
                self._running_here.pop(key, None)
                while len(self._results) > self.keep:
                    self._results.popitem(last=False)
        return result

    def _forget_old_jobs(self) -> None:
        """Keep at most ``keep`` finished results; unfinished jobs stay (someone waits for them)."""
        finished = [key for key, (job, _) in self._jobs.items() if job.finished]
        for key in finished[:max(0, len(finished) - self.keep)]:
            del self._jobs[key]


def _anyone_waits(tickets: list[Ticket]) -> bool:
    """A shared job's alive check: some session still waits for it."""
    return any(t.wanted for t in tickets)
