"""The threshold controls, drawn at the top of each page's main pane: MeanSparse on/off, alpha, a second alpha.

They sit next to what they change (and, on Explore, in one ``st.fragment`` with it, so that a slider
move reruns only what depends on alpha). Pages draw them, so Streamlit would forget their values after a
run that does not draw them: ``keep_values`` carries those over.
"""

from __future__ import annotations

from dataclasses import replace

import streamlit as st
from streamlit.errors import StreamlitAPIException

from ui.state import Setup, layer_overrides

DEFAULT_ALPHA = 0.2
DEFAULTS = {"sparsify": True, "alpha": DEFAULT_ALPHA, "compare": False, "alpha2": 0.0}
ALPHA_LABEL = "alpha (band half-width in standard deviations)"


def fill_defaults(page: str) -> None:
    """Before ``page`` runs: each control's default the first time, and its last value after a page switch.

    Each page's widgets are new ones, which would start at their own defaults: a value set by the
    script carries over. Only then, see ``keep_values``.
    """
    state = st.session_state
    switched = state.get("controls_page") != page
    state["controls_page"] = page
    for key, default in DEFAULTS.items():
        if switched or key not in state:
            state[key] = state.get(key, default)


def keep_values() -> None:
    """After the page ran: carry over the values of the controls it did not draw.

    Those it drew keep theirs. Reassigning one of those before every run (as this app once did)
    marks its value as set by the script, and the browser shows that value once the run ends:
    arrow keys pressed on the slider while a page run was going were undone on screen (slider back at
    0.2, predictions at 0.4).
    """
    for key, default in DEFAULTS.items():
        try:
            st.session_state[key] = st.session_state.get(key, default)
        except StreamlitAPIException:  # drawn in this run: Streamlit keeps its value
            pass


def chosen() -> tuple[float, float | None]:
    """(alpha, second alpha or None) as last set; alpha 0 while MeanSparse is switched off."""
    state = st.session_state
    alpha = state.get("alpha", DEFAULT_ALPHA) if state.get("sparsify", True) else 0.0
    return alpha, state.get("alpha2", 0.0) if state.get("compare", False) else None


def threshold_ui(current: Setup) -> Setup:
    """Draw the controls in one row and return the setup with the alphas they set."""
    toggles, slider, second = st.columns([1.4, 3, 2], vertical_alignment="bottom")
    toggles.toggle("Sparsify", key="sparsify", disabled=current.sparse is None)
    toggles.toggle("Compare two alphas", key="compare")
    slider.slider(ALPHA_LABEL, 0.0, 2.0, step=0.01, key="alpha")
    if st.session_state["compare"]:
        second.slider("second alpha (0 is the base model)", 0.0, 2.0, step=0.01, key="alpha2")
    on = st.session_state["sparsify"] and current.sparse is not None
    alpha, compare_alpha = chosen() if on else (0.0, None)
    return replace(current, alpha=alpha, compare_alpha=compare_alpha,
                   layer_alphas=layer_overrides(current.sparse) if on else {})
