"""The presentation layout: for a projector, what alpha changes fits one 1280x720 screen, in large type.

Pages ask ``presenting()`` to put the stage (controls, images, predictions) first and drop their
introductions; ``panels.chart_ui``, which draws every chart, sets the larger type (``chart_style.in_large_type``).
"""

from __future__ import annotations

import streamlit as st

#: Presenting: less padding above the page, no toolbar strip, tighter gaps, larger widget labels.
PRESENTATION_CSS = """<style>
[data-testid="stMainBlockContainer"] { padding-top: 0.75rem; padding-bottom: 1rem; }
[data-testid="stHeader"] { height: 0; background: transparent; }
[data-testid="stMain"] [data-testid="stVerticalBlock"] { gap: 0.4rem; }
[data-testid="stMain"] [data-testid="stWidgetLabel"] p, [data-testid="stMain"] [data-testid="stMarkdownContainer"] p,
[data-testid="stMain"] [data-testid="stCaptionContainer"] { font-size: 1.05rem; }
</style>"""


def presenting() -> bool:
    return st.session_state.get("presentation", False)


def presentation_ui() -> None:
    """The layout switch (top of the sidebar); it is part of the page's link."""
    st.sidebar.toggle("Presentation layout", key="presentation",
                      help="For a projector: alpha, the images and the predictions on one 1280x720 screen, "
                           "large type. The sidebar can be closed with the arrow at its top.")
    if presenting():
        st.html(PRESENTATION_CSS)


def side_by_side(count: int, stacked: bool = False) -> list:
    """``count`` columns; one above the other when ``stacked`` or presenting: a chart in the large type
    needs the whole width (at half of 1280 px its tick labels and legends overlapped)."""
    return [st.container() for _ in range(count)] if stacked or presenting() else st.columns(count)
