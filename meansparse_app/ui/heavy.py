"""Heavy work (AutoAttack, long Square runs, sweeps, calibration) through the server's one job queue.

A page submits the work and keeps drawing: the job runs in a worker thread of the queue, the
session keeps its ticket in ``st.session_state``, and a fragment polls the ticket, showing the queue
position or the progress, until the job ended; then the page reruns and ``collect`` hands it the
result. Sessions asking for the same computation (same request) hold tickets on one shared job and
read its result without changing it. Slider moves and top-5 never enter the queue.
"""

from __future__ import annotations

from typing import Callable, Hashable, TypeVar

import streamlit as st
from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

from meansparse_core.jobs import Job, JobQueue
from meansparse_core.sharing import SharedWork, Ticket

from meansparse_app.ui.errors import shown_errors

T = TypeVar("T")
POLL_S = 1.0


@st.cache_resource
def job_queue() -> JobQueue:
    """The server's queue, shared by every session."""
    return JobQueue.for_this_machine()


@st.cache_resource
def shared_work() -> SharedWork:
    """Requests of every session, keyed by what determines their result: one job (or one call) per key."""
    return SharedWork(job_queue())


def _session() -> tuple[str | None, Callable[[], bool]]:
    """The session submitting now, and whether it still has a browser tab open (None and always True
    outside a server)."""
    context = get_script_run_ctx()
    if context is None or not Runtime.exists():
        return None, lambda: True
    session, runtime = context.session_id, Runtime.instance()
    return session, lambda: runtime.is_active_session(session)


def submit(kind: str, description: str, work: Callable[[Job], T], request: Hashable) -> None:
    """Queue ``work(job)`` for this session, in place of its previous job of the same kind (cancelled), unless
    that one was for the same ``request``: a form submitted twice runs once. A session with too many jobs
    unfinished is told so in one sentence.

    ``request`` holds everything that determines the result: identical requests of all sessions share
    one job (a class opening the lecturer's link runs its attack once) and its result, read-only."""
    if st.session_state.get(f"request/{kind}") == request and pending(kind):
        return
    cancel(kind)
    session, alive = _session()
    with shown_errors():
        st.session_state[f"job/{kind}"] = shared_work().submit(request, work, description, alive, owner=session)
        st.session_state[f"request/{kind}"] = request


def cancel(kind: str) -> None:
    job: Ticket | None = st.session_state.pop(f"job/{kind}", None)
    if job is not None:
        job.cancel()


def collect(kind: str):
    """The result of this session's finished job of ``kind``, once (None while it waits or runs, and after
    a failure, which is shown as one sentence)."""
    job: Ticket | None = st.session_state.get(f"job/{kind}")
    if job is None or not job.finished:
        return None
    del st.session_state[f"job/{kind}"]
    if job.state == "cancelled":
        return None
    with shown_errors():
        return job.result()
    return None


def pending(kind: str) -> bool:
    return f"job/{kind}" in st.session_state


def status_ui(kind: str) -> None:
    """Where this session's job of ``kind`` stands, redrawn every ``POLL_S`` seconds until it ended."""
    if pending(kind):
        _status_fragment(kind)


@st.fragment(run_every=POLL_S)
def _status_fragment(kind: str) -> None:
    job: Ticket | None = st.session_state.get(f"job/{kind}")
    if job is None:
        return
    if job.finished:
        st.rerun()  # the whole page, which collects the result
    position = job.position
    if position is not None:
        queue = job_queue()
        st.info(f"{job.description}: queued, position {position} (the server runs {queue.workers} heavy "
                f"job{'s' if queue.workers > 1 else ''} at a time). The slider and the predictions do not wait.")
    else:
        st.progress(job.progress, f"{job.description}: {job.message or 'running'}")
    if st.button("Cancel", key=f"cancel_job_{kind}"):
        cancel(kind)
        st.rerun()
