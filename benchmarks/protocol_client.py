"""A Streamlit client without a browser: the app's websocket and the protobuf messages Streamlit ships.

What a browser tab does, reduced to what a load test needs. It connects to ``/_stcore/stream``, asks
for script runs the way Streamlit's frontend does (a ``BackMsg`` whose ``rerun_script`` carries the
page's script hash, the query string and the widget values), and reads the ``ForwardMsg`` stream:
the elements of each run (their text, and the widgets with their ids), until ``script_finished``.
Widgets are found by their user key or label in the elements the server sent, as a user finds them
on the page. Like the frontend, it keeps every widget value it set and sends them all with each
rerun, sends a button's trigger once, sends a widget's fragment id with a rerun of a fragment's
widget, and follows the server's auto-reruns (``st.fragment(run_every=...)``).

    client = await ProtocolClient.connect("http://127.0.0.1:8501")
    run = await client.rerun()  # the first page run
    run = await client.set_value("alpha", 0.3)  # a slider, by key: the fragment's run
    print(run.texts)
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import websockets
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState

#: Element fields whose text a user reads on the page.
TEXT_FIELDS = {"markdown": "body", "heading": "body", "alert": "body", "text": "body", "code": "code_text",
               "exception": "message", "metric": "label", "progress": "text"}
#: How runs end when they drew the whole page (or the whole fragment).
COMPLETED = ("FINISHED_SUCCESSFULLY", "FINISHED_FRAGMENT_RUN_SUCCESSFULLY")
#: Widget element fields, and how their value travels back (``WidgetState``'s field).
WIDGETS = {"slider": "double_array_value", "button": "trigger_value", "number_input": None, "checkbox": "bool_value",
           "radio": "int_value", "selectbox": "int_value", "text_input": "string_value"}


@dataclass
class Widget:
    """A widget the server drew: what a user sees of it and what a rerun sends back."""

    id: str
    kind: str  # the element field: "slider", "button", ...
    label: str
    fragment_id: str  # "" outside any fragment
    form_id: str
    options: list[str]
    integer: bool  # number inputs: int or double values
    maximum: float | None  # number inputs: the largest value allowed

    @property
    def key(self) -> str | None:
        """The user key the app gave it (Streamlit's ids end in it), or None."""
        key = self.id.split("-", maxsplit=2)[-1]
        return None if key == "None" else key


@dataclass
class Run:
    """One completed script run (or fragment run) as the client saw it."""

    status: str  # ForwardMsg.ScriptFinishedStatus's name
    texts: list[str] = field(default_factory=list)
    widgets: list[Widget] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)  # exception elements and error boxes
    fragment_id: str = ""
    ended_at: float = 0.0
    auto_reruns: list[str] = field(default_factory=list)  # fragments that asked to rerun on a timer


class ProtocolClient:
    """One app session over one websocket."""

    def __init__(self, socket, url: str) -> None:
        self.socket, self.url = socket, url
        self.query_string = ""
        self.page_hash = ""
        self.pages: dict[str, str] = {}  # page title -> script hash
        self.widgets: dict[str, Widget] = {}  # by id, as last drawn
        self.values: dict[str, WidgetState] = {}  # every value this client set, sent with each rerun
        self.runs: asyncio.Queue[Run] = asyncio.Queue()
        self.auto_reruns: dict[str, asyncio.Task] = {}  # fragment id -> its timer
        self._current = Run("")
        self.interrupted = 0  # runs that ended early (a new rerun request, ``st.rerun``)
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, query_string: str = "") -> "ProtocolClient":
        stream = re.sub(r"^http", "ws", url.rstrip("/")) + "/_stcore/stream"
        # The browser's Origin header: the server refuses websockets from other sites.
        socket = await websockets.connect(stream, subprotocols=["streamlit"], origin=url.rstrip("/"),
                                          max_size=None, ping_interval=None)
        client = cls(socket, url)
        client.query_string = query_string
        return client

    async def close(self) -> None:
        for timer in self.auto_reruns.values():
            timer.cancel()
        self._reader.cancel()
        await self.socket.close()

    # Requests --------------------------------------------------------------------------------------

    async def send_rerun(self, triggers: dict[str, WidgetState] = {}, fragment_id: str = "",
                         page: str | None = None, auto: bool = False) -> None:
        """Ask for a run with every value set so far (plus ``triggers``, this run only)."""
        message = BackMsg()
        state = message.rerun_script
        state.query_string = self.query_string
        state.page_script_hash = self.pages[page] if page is not None else self.page_hash
        state.fragment_id = fragment_id
        state.is_auto_rerun = auto
        state.context_info.url = f"{self.url}?{self.query_string}" if self.query_string else self.url
        state.context_info.timezone = "UTC"
        state.context_info.locale = "en-US"
        for value in {**self.values, **triggers}.values():
            state.widget_states.widgets.append(value)
        await self.socket.send(message.SerializeToString())

    async def rerun(self, **kwargs) -> Run:
        """A run as the page's first load (or a reload) asks for it; returns the run once it ended."""
        self.drain()
        await self.send_rerun(**kwargs)
        return await self.next_run()

    def find(self, name: str) -> Widget:
        """The widget last drawn with user key ``name``, else with label ``name``."""
        for test in (lambda w: w.key == name, lambda w: w.label == name):
            found = [w for w in self.widgets.values() if test(w)]
            if found:
                return found[-1]
        raise LookupError(f"no widget with key or label {name!r} on the page")

    def value_of(self, widget: Widget, value: Any) -> WidgetState:
        state = WidgetState(id=widget.id)
        if widget.kind == "slider":
            state.double_array_value.data.extend([value] if isinstance(value, (int, float)) else value)
        elif widget.kind == "number_input":
            if widget.integer:
                state.int_value = int(value)
            else:
                state.double_value = float(value)
        elif widget.kind in ("radio", "selectbox"):
            state.int_value = widget.options.index(value)
        else:
            setattr(state, WIDGETS[widget.kind], value)
        return state

    async def set_value(self, name: str, value: Any, wait: bool = True) -> Run | None:
        """Change a widget outside a form, as a user does: the rerun it causes (its fragment's, if in one)."""
        widget = self.find(name)
        self.values[widget.id] = self.value_of(widget, value)
        self.drain()
        await self.send_rerun(fragment_id=widget.fragment_id)
        return await self.next_run() if wait else None

    def fill(self, name: str, value: Any) -> None:
        """Change a widget inside a form: sent when the form is submitted."""
        widget = self.find(name)
        self.values[widget.id] = self.value_of(widget, value)

    async def click(self, name: str, wait: bool = True) -> Run | None:
        """Press a button (or a form's submit button): one rerun with its trigger set."""
        widget = self.find(name)
        self.drain()
        await self.send_rerun({widget.id: WidgetState(id=widget.id, trigger_value=True)}, widget.fragment_id)
        return await self.next_run() if wait else None

    async def open_page(self, title: str) -> Run:
        """Follow a navigation link (``st.navigation``'s page title)."""
        self.drain()
        await self.send_rerun(page=title)
        return await self.next_run()

    # Responses -------------------------------------------------------------------------------------

    def drain(self) -> None:
        """Forget runs that ended before the request about to be sent."""
        while not self.runs.empty():
            self.runs.get_nowait()

    async def next_run(self, timeout: float = 600) -> Run:
        """The next run that completes (of the whole script or a fragment); interrupted ones are skipped."""
        return await asyncio.wait_for(self.runs.get(), timeout)

    async def run_until(self, done: Callable[[Run], bool], timeout: float = 600) -> Run:
        """Runs as they end, until one for which ``done`` holds; it is returned."""
        deadline = time.monotonic() + timeout
        while True:
            run = await self.next_run(max(deadline - time.monotonic(), 0.001))
            if done(run):
                return run

    async def _read(self) -> None:
        async for data in self.socket:
            message = ForwardMsg()
            message.ParseFromString(data)
            self._handle(message)

    def _handle(self, message: ForwardMsg) -> None:
        kind = message.WhichOneof("type")
        if kind == "new_session":
            self.page_hash = message.new_session.page_script_hash
        elif kind == "navigation":
            self.pages = {p.page_name: p.page_script_hash for p in message.navigation.app_pages}
            self.page_hash = message.navigation.page_script_hash or self.page_hash
        elif kind == "page_info_changed":
            self.query_string = message.page_info_changed.query_string
        elif kind == "delta":
            self._element(message.delta)
        elif kind == "auto_rerun":
            self._schedule(message.auto_rerun.fragment_id, message.auto_rerun.interval)
            self._current.auto_reruns.append(message.auto_rerun.fragment_id)
        elif kind == "stop_auto_rerun":
            for fragment_id in message.stop_auto_rerun.fragment_ids:
                self.stop_auto_reruns(fragment_id)
        elif kind == "script_finished":
            self._current.status = ForwardMsg.ScriptFinishedStatus.Name(message.script_finished)
            if self._current.status == "FINISHED_SUCCESSFULLY":  # a whole run: fragments it did not draw stop
                for fragment_id in set(self.auto_reruns) - set(self._current.auto_reruns):
                    self.stop_auto_reruns(fragment_id)
            self._current.ended_at = time.perf_counter()
            if self._current.status in COMPLETED:  # an interrupted run's page is not what the user is left with
                self.runs.put_nowait(self._current)
            else:
                self.interrupted += 1
            self._current = Run("")

    def _element(self, delta) -> None:
        if delta.WhichOneof("type") != "new_element":
            return
        element, run = delta.new_element, self._current
        run.fragment_id = run.fragment_id or delta.fragment_id
        kind = element.WhichOneof("type")
        if kind in TEXT_FIELDS:
            text = getattr(getattr(element, kind), TEXT_FIELDS[kind])
            run.texts.append(text.replace("**", ""))
            if kind == "exception" or (kind == "alert" and element.alert.format == element.alert.ERROR):
                run.exceptions.append(text)
            if kind == "metric":
                run.texts.append(element.metric.body)
        if kind == "imgs":
            run.texts.extend(image.caption for image in element.imgs.imgs)
        if kind in WIDGETS:
            proto = getattr(element, kind)
            widget = Widget(proto.id, kind, proto.label, delta.fragment_id, getattr(proto, "form_id", ""),
                            list(getattr(proto, "options", [])),
                            kind == "number_input" and proto.data_type == proto.INT,
                            proto.max if kind == "number_input" and proto.has_max else None)
            run.widgets.append(widget)
            self.widgets[widget.id] = widget
            run.texts.append(proto.label)

    def _schedule(self, fragment_id: str, interval: float) -> None:
        """The frontend's timer for ``st.fragment(run_every=...)``: rerun that fragment every ``interval`` s."""
        async def tick() -> None:
            while True:
                await asyncio.sleep(interval)
                await self.send_rerun(fragment_id=fragment_id, auto=True)

        previous = self.auto_reruns.pop(fragment_id, None)
        if previous is not None:
            previous.cancel()
        self.auto_reruns[fragment_id] = asyncio.create_task(tick())

    def stop_auto_reruns(self, fragment_id: str) -> None:
        timer = self.auto_reruns.pop(fragment_id, None)
        if timer is not None:
            timer.cancel()
