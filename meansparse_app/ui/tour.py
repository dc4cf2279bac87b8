"""The guided tour, driving the real pages: a box on top of the page with the step's sentence and Back/Next.

Buttons act in callbacks (before the next run): the step's alpha is set before the slider is drawn,
its page is opened by ``follow_tour``, and what needs the loaded model (image, attack, layer) is
done by ``carry_out`` once the sidebar has set up the session. ``TOUR`` is the steps' text.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from meansparse_app.ui import state, threshold
from meansparse_app.ui.state import Setup


@dataclass(frozen=True)
class TourStep:
    """One step: what it says, which page it opens, and what it sets up there."""

    title: str
    text: str
    page: str  # one of ui.view_link.PAGES
    alpha: float | None = None  # set the slider (and switch MeanSparse on)
    first_image: bool = False  # pick the opening image (one the attack fools: state.opening)
    attack: bool = False  # craft the page's default attack (PGD against the base model)
    last_layer: bool = False  # open the Layers page on the last tap before the classifier


TOUR = (
    TourStep("Pick an image", "A test image and what each model makes of it: the bars are the top-5 classes, green "
             "is the true class; the panels put the base model next to the same model with MeanSparse at alpha 0.2.",
             "explore", alpha=0.2, first_image=True),
    TourStep("Attack it", "PGD changes each pixel by at most eps, steering the base model away from the true class; "
             "the perturbation is scaled up so you can see it. Look at the two 'adversarial' panels.",
             "explore", attack=True),
    TourStep("Switch MeanSparse off", "At alpha 0 the operator replaces nothing: both models compute the same "
             "features, so they give the same answer on the adversarial image.", "explore", alpha=0.0),
    TourStep("Raise alpha", "At alpha 1, every feature within one standard deviation of its channel's mean is "
             "replaced by that mean. Does the true class come back on the adversarial image, and what happens "
             "on the clean one? The adversarial example stays the one crafted against the base model.",
             "explore", alpha=1.0),
    TourStep("Look inside", "The last layer before the classifier: the grey band is what the operator replaces. "
             "Compare the clean and the adversarial features before and after it, and the charts over depth below.",
             "layers", last_layer=True),
    TourStep("Measure on many images", "One image proves little. A sweep attacks MeanSparse itself at each alpha; "
             "BPDA (straight-through gradients) checks the gain: if only the plain attack's line rises, the gain "
             "is gradient masking, not robustness.", "accuracy"),
    TourStep("Why stay sceptical", "How the operator works, why its zero gradient can fool an attacker, and what "
             "RobustBench's own BPDA evaluation found for the published models.", "learn"),
)


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
        state.pick(state.test_image(current, state.opening(current).index))
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
