"""MeanSparse Explorer: pick a robust model and an image, slide the threshold, attack, and look inside.

The sidebar (model, data, statistics, alpha) is drawn here once for every page; the pages read
what it set up from the session.
"""

import streamlit as st

from ui.errors import shown_errors
from ui.sidebar import sidebar_ui

PAGES = [
    st.Page("views/explore.py", title="Explore", icon=":material/image_search:", default=True),
    st.Page("views/layers.py", title="Layers", icon=":material/stacked_bar_chart:"),
    st.Page("views/accuracy.py", title="Accuracy", icon=":material/monitoring:"),
    st.Page("views/learn.py", title="Learn", icon=":material/school:"),
]


def main() -> None:
    st.set_page_config(page_title="MeanSparse Explorer", layout="wide")
    page = st.navigation(PAGES)
    with shown_errors():
        st.session_state["setup"] = sidebar_ui()
        page.run()


main()
