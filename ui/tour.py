"""The guided tour, driving the real pages: a box on top of the page with the step's sentence and Back/Next.

Buttons act in callbacks (before the next run): the step's alpha is set before the slider is drawn,
its page is opened by ``follow_tour``, and what needs the loaded model (image, attack, layer) is
done by ``carry_out`` once the sidebar has set up the session.
"""

from __future__ import annotations

import streamlit as st

from meansparse_core.tour import TOUR, TourStep
from ui import state, threshold
from ui.state import Setup

STEP, GOTO, TODO = "tour_step", "tour_goto", "tour_todo"


def go_to_step(index: int | None) -> None:
    """Callback: start, move or (with None) end the tour."""
    st.session_state[STEP] = index
    if index is None:
        return
    step = TOUR[index]
    if step.alpha is not None:
        threshold.set_controls(alpha=step.alpha, sparsify=True, compare=False)
    st.session_state[GOTO], st.session_state[TODO] = step.page, step


def follow_tour(pages: dict) -> None:
    """Open the current step's page (before the sidebar is drawn)."""
    page = st.session_state.pop(GOTO, None)
    if page is not None and page != st.session_state.get("page_name"):
        st.switch_page(pages[page])


def carry_out(current: Setup) -> None:
    """Do what the step needs the loaded model for: pick the image, craft the attack, open the layer."""
    step: TourStep | None = st.session_state.pop(TODO, None)
    if step is None or current.sparse is None:
        return
    if step.first_image and current.test_set is not None:
        state.pick(state.test_image(current, state.gallery_order(len(current.test_set))[0]))
    if step.attack:
        picked = state.picked_image(current)
        state.craft(current, picked, state.default_attack(current))
    if step.last_layer:
        st.session_state["layer"] = current.sparse.taps[-1]


def start_ui() -> None:
    st.sidebar.button("Guided tour", key="tour_start", icon=":material/tour:", on_click=go_to_step, args=(0,),
                      help=f"{len(TOUR)} steps through the pages, a sentence each.", width="stretch")


def tour_ui() -> None:
    """The current step's box at the top of the main pane."""
    index = st.session_state.get(STEP)
    if index is None:
        return
    step = TOUR[index]
    with st.container(border=True):
        st.markdown(f"**Tour, step {index + 1} of {len(TOUR)}: {step.title}.** {step.text}")
        back, forward, end = st.columns([1, 1, 4])
        back.button("Back", key="tour_back", on_click=go_to_step, args=(index - 1,), disabled=index == 0)
        last = index == len(TOUR) - 1
        forward.button("Finish" if last else "Next", key="tour_next", type="primary",
                       on_click=go_to_step, args=(None if last else index + 1,))
        end.button("End the tour", key="tour_end", on_click=go_to_step, args=(None,))
