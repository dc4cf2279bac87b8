"""The threshold controls, drawn at the top of each page's main pane: MeanSparse on/off, alpha, a second alpha.

They sit next to what they change (and, on Explore, in one ``st.fragment`` with it, so that a slider
move reruns only what depends on alpha). Each page draws its own, and Streamlit drops a widget's value
when the page changes or a run does not draw it: the values are also kept under a plain key
(``KEPT``), written whenever the controls are drawn or set (``set_controls``), and put back from there.
"""

from __future__ import annotations

from dataclasses import replace

import streamlit as st

from meansparse_core.limits import LIMITS
from meansparse_app.ui.state import Setup, layer_overrides

DEFAULT_ALPHA = 0.2
DEFAULTS = {"sparsify": True, "alpha": DEFAULT_ALPHA, "compare": False, "alpha2": 0.0}
ALPHA_LABEL = "alpha (band half-width in standard deviations)"
KEPT = "threshold_controls"  # session key: the controls' last values; not a widget's, so never dropped


def kept() -> dict:
    return st.session_state.setdefault(KEPT, dict(DEFAULTS))


def fill_defaults(page: str) -> None:
    """Before ``page`` runs: each control's last value, on a page switch and wherever Streamlit dropped it.

    Otherwise a control keeps the value the browser sent: setting it from the script marks it as
    set, and the browser shows that value when the run ends, undoing arrow keys pressed on the
    slider while the run was going (slider back at 0.2, predictions at 0.4).
    """
    state = st.session_state
    switched = state.get("controls_page") != page
    state["controls_page"] = page
    for key, value in kept().items():
        if switched or key not in state:
            state[key] = value


def set_controls(**values) -> None:
    """Set controls from the script (a link, a tour step, a model's published alpha): before they are drawn."""
    st.session_state.update(values)
    kept().update(values)


def chosen() -> tuple[float, float | None]:
    """(alpha, second alpha or None) as last set; alpha 0 while MeanSparse is switched off."""
    state = st.session_state
    alpha = state.get("alpha", DEFAULT_ALPHA) if state.get("sparsify", True) else 0.0
    return alpha, state.get("alpha2", 0.0) if state.get("compare", False) else None


def threshold_ui(current: Setup) -> Setup:
    """Draw the controls in one row and return the setup with the alphas they set."""
    state = st.session_state
    # Each control's default is its current value: the browser falls back to a widget's default when a
    # click interrupted the run that first drew it (the page's first run, a page switch), and Streamlit's
    # own default (the slider's minimum, toggles off) then replaced alpha 0.2 by 0 (seen in B9).
    toggles, slider, second = st.columns([1.9, 3, 1.6], vertical_alignment="bottom")  # "Compare two alphas" uncut at 1280 px
    toggles.toggle("Sparsify", state["sparsify"], key="sparsify", disabled=current.sparse is None)
    toggles.toggle("Compare two alphas", state["compare"], key="compare")
    slider.slider(ALPHA_LABEL, 0.0, LIMITS.slider_max, state["alpha"], step=LIMITS.slider_step, key="alpha")
    if state["compare"]:
        # A short label: a wrapped one pushed the presentation layout's predictions below 720 px.
        second.slider("second alpha", 0.0, LIMITS.slider_max, state["alpha2"], step=LIMITS.slider_step, key="alpha2",
                      help="0 is the base model (MeanSparse off).")
    kept().update({key: state[key] for key in DEFAULTS if key in state})
    on = state["sparsify"] and current.sparse is not None
    alpha, compare_alpha = chosen() if on else (0.0, None)
    return replace(current, alpha=alpha, compare_alpha=compare_alpha,
                   layer_alphas=layer_overrides(current.sparse) if on else {})
