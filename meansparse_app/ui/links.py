"""Shareable links: the URL's query parameters follow the view, and opening a link restores it.

Parsing and checking are ``ui.view_link``; here the parsed view is put into the session:
widget values before the sidebar is drawn (``open_link``), then what needs the loaded model and data
(image, attack, layer: ``restore_view``). What cannot be used is named in one notice.
"""

from __future__ import annotations

from urllib.parse import urlencode

import streamlit as st

from meansparse_core.data import DATASETS
from meansparse_core.models import find_model
from meansparse_app.ui import state, threshold
from meansparse_app.ui.state import Setup
from meansparse_app.ui.view_link import ViewLink, ignored_notice, link_params, parse_link

PENDING, NOTICE = "link_pending", "link_notice"


def open_link(pages: dict) -> None:
    """Once per session: read the link it was opened with, set the controls, and go to its page."""
    if "link_read" in st.session_state:
        return
    st.session_state["link_read"] = True
    view, ignored = parse_link({key: st.query_params.get_all(key) for key in st.query_params})
    session = st.session_state
    if view.presentation:
        session["presentation"] = True
    if view.alpha is not None:
        threshold.set_controls(alpha=view.alpha, sparsify=True)
    if view.compare_alpha is not None:
        threshold.set_controls(alpha2=view.compare_alpha, compare=True)
    if view.layer_alphas:
        session["layer_alphas"] = dict(view.layer_alphas)
    if view.model is not None and not _choose_model(view.model, view.data):
        ignored.append("model")
    if view.placement is not None:
        session["placement"] = view.placement  # the sidebar's radio; a model with its own layers ignores it
    session[PENDING], session[NOTICE] = view, ignored
    if view.page is not None and view.page != session.get("page_name"):
        st.switch_page(pages[view.page])


def _choose_model(key: str, data: str | None) -> bool:
    """Set the sidebar's model (and data) widgets to a linked model; False when there is no such model."""
    try:
        spec = find_model(key)
    except (KeyError, ValueError):
        return False
    if spec.source == "robustbench":
        st.session_state.update(model_source="RobustBench zoo", zoo_dataset=spec.dataset, zoo_threat=spec.threat,
                                zoo_search="", zoo_model=spec)
    else:
        st.session_state.update(model_source="Demo models", demo_model=spec)
    if data is not None and DATASETS[data].image_size == spec.input_size:  # the sidebar offers only those
        st.session_state[f"data_for_{spec.dataset}"] = data
    return True


def restore_view(current: Setup) -> None:
    """Once the model and data are loaded: the linked test image, attack and layer; then the notice, once."""
    view: ViewLink | None = st.session_state.pop(PENDING, None)
    ignored: list[str] = st.session_state.pop(NOTICE, [])
    if view is not None:
        ignored += _restore_image_and_attack(current, view)
        if view.layer is not None:
            taps = {t.name: t for t in current.sparse.taps} if current.sparse else {}
            if view.layer in taps:
                st.session_state["layer"] = taps[view.layer]
            else:
                ignored.append("layer")
    notice = ignored_notice(ignored)
    if notice:
        st.warning(notice, icon=":material/link_off:")


def _restore_image_and_attack(current: Setup, view: ViewLink) -> list[str]:
    """Pick the linked test image and re-craft the linked attack on it; the names of what could not be used."""
    attack = ["attack"] if view.attack is not None else []
    if view.image is None:
        return attack
    if current.test_set is None or view.image >= len(current.test_set):
        return ["image", *attack]
    picked = state.test_image(current, view.image)
    state.pick(picked)
    if view.attack is not None and current.sparse is not None:
        state.craft(current, picked, view.attack)
    return []


def current_view(current: Setup) -> ViewLink:
    """What the session shows now, as a link."""
    session = st.session_state
    picked: state.Picked | None = session.get("picked")
    image = int(picked.key.split("/")[1]) if picked is not None and picked.key.startswith("test/") else None
    crafted: state.Crafted | None = session.get("adversarial")  # not state.adversarial: that collects queued jobs
    if image is None or crafted is None or crafted.for_key != (current.model_id, picked.key):
        crafted = None
    alpha, compare_alpha = threshold.chosen()
    layer = session.get("layer")
    return ViewLink(page=session.get("page_name"), model=None if current.model.checkpoint else current.model.key,
                    data=current.data, image=image, alpha=alpha, compare_alpha=compare_alpha,
                    layer_alphas=tuple(sorted(session.get("layer_alphas", {}).items())),
                    layer=getattr(layer, "name", None), placement=current.placement,
                    attack=crafted.choice if crafted else None,
                    presentation=session.get("presentation", False))


def write_link(current: Setup) -> None:
    """Put the current view into the URL, so that the address bar follows every change."""
    params = link_params(current_view(current))
    if st.query_params.to_dict() != params:
        st.query_params.from_dict(params)


def link_ui(current: Setup) -> None:
    """Write the view into the URL and offer it in a box with a copy button (drawn after what it describes)."""
    write_link(current)
    base = (st.context.url or "").split("?")[0]
    with st.popover("Copy link", icon=":material/link:"):
        query = urlencode(link_params(current_view(current)), safe="/:,")
        st.code(f"{base}?{query}", language=None, wrap_lines=True)
        st.caption("Opening it restores this page, model, image, alpha and attack (re-crafted with its seed).")
