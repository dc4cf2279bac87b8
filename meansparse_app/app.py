"""MeanSparse Explorer: pick a robust model and an image, slide the threshold, attack, and look inside.

Every run: the link the session was opened with (once), the tour, the sidebar (model, data,
statistics), then the page, which reads what the sidebar set up from the session.
"""

import streamlit as st

from meansparse_app.ui import layout, links, threshold, tour
from meansparse_app.ui.errors import shown_errors
from meansparse_app.ui.sidebar import sidebar_ui
from meansparse_app.ui.view_link import PAGES as PAGE_NAMES

PAGES = dict(zip(PAGE_NAMES, [
    st.Page("views/explore.py", title="Explore", icon=":material/image_search:", default=True),
    st.Page("views/layers.py", title="Layers", icon=":material/stacked_bar_chart:"),
    st.Page("views/accuracy.py", title="Accuracy", icon=":material/monitoring:"),
    st.Page("views/learn.py", title="Learn", icon=":material/school:"),
]))


def main() -> None:
    st.set_page_config(page_title="MeanSparse Explorer", layout="wide")
    page = st.navigation(list(PAGES.values()))
    st.session_state["page_name"] = page.title.lower()
    with shown_errors():
        threshold.fill_defaults(st.session_state["page_name"])
        links.open_link(PAGES)
        tour.follow_tour(PAGES)
        layout.presentation_ui()
        tour.start_ui()
        current = sidebar_ui()
        links.restore_view(current)
        tour.carry_out(current)
        tour.tour_ui()
        st.session_state["setup"] = current
        try:
            page.run()
        finally:
            links.write_link(current)


# Streamlit runs this file as __main__ and leaves it installed as sys.modules["__main__"]; a process
# started with multiprocessing's "spawn" re-runs that file (as __mp_main__) before its own work, so
# the app must only start when it is the script being run.
if __name__ == "__main__":
    main()
