"""Panels several pages draw: the gallery, the accuracy figures, and image and file helpers."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import streamlit as st
import torch

from meansparse_core.accuracy_table import nearest, with_interval
from meansparse_core.data import Preparation
from meansparse_core.photos import PHOTOS, available as photos_available
from meansparse_app.ui.chart_style import EXPORT_FORMATS, download_config, in_large_type
from meansparse_app.ui.layout import presenting
from meansparse_app.ui.loaders import cached_live_curve
from meansparse_app.ui.state import Picked, Setup, gallery_order, pick, picked_image, test_image


def gallery_ui(current: Setup, count: int = 8) -> None:
    """A row of test images with labels; a button under each picks it, and the picked one is marked."""
    if current.test_set is None:
        return
    order = gallery_order(len(current.test_set))
    chosen = picked_image(current).key
    # The gallery opens on the page holding the session's image (the opening image may be past the first page).
    page = st.session_state.get("gallery_page", order.index(int(chosen[5:])) // count if chosen.startswith("test/") else 0)
    columns = st.columns(count)
    for column, index in zip(columns, order[page * count:(page + 1) * count]):
        picked = test_image(current, index)
        here = picked.key == chosen
        column.image(to_display(picked.image), caption=("▶ " if here else "") + current.spec.class_names[picked.label],
                     width="stretch")
        column.button("Picked" if here else "Pick", key=f"pick_{index}", on_click=pick, args=(picked,),
                      disabled=here, type="primary" if here else "secondary", icon=":material/check:" if here else None)
    if st.button("More images", key="gallery_more"):
        st.session_state["gallery_page"] = page + 1
        st.rerun()


@st.cache_resource(show_spinner=False)
def _photo_choices(size: tuple[int, int, int], preparation: Preparation) -> list[Picked]:
    """The built-in photos as pickable images for a model's input, each with its class where one fits."""
    return [Picked(f"photo/{p.file}", p.image(size, preparation), p.label,
                   f"{p.title} ({p.imagenet_class or 'true class unknown'})") for p in PHOTOS]


def photo_gallery_ui(current: Setup) -> None:
    """Real photos that ship with scikit-image, for ImageNet models: no download, no data folder. With no
    labelled data on this machine, the first one is the page's image until another is picked."""
    spec = current.spec
    if spec.dataset != "imagenet" or not photos_available():
        return
    choices = _photo_choices(spec.input_size, spec.preparation)
    picked = st.session_state.get("picked")
    if current.test_set is None and (picked is None or picked.image.shape != spec.input_size):
        pick(choices[0])
        picked = choices[0]
    chosen = getattr(picked, "key", None)
    st.caption("Built-in photos (CC0 or public domain, from scikit-image):")
    for column, choice in zip(st.columns(len(choices)), choices):
        here = choice.key == chosen
        column.image(to_display(choice.image, 128), caption=("▶ " if here else "") + choice.caption, width="stretch")
        column.button("Picked" if here else "Pick", key=f"pick_{choice.key}", on_click=pick, args=(choice,),
                      disabled=here, type="primary" if here else "secondary", icon=":material/check:" if here else None)


def accuracy_panel_ui(current: Setup) -> None:
    """Clean and transfer accuracy at the current alpha (live), and the last sweep's adaptive figure."""
    sparse = current.sparse
    if sparse is None or current.test_set is None:
        return
    curve = cached_live_curve(current.model, current.data, current.data_root, current.eps, current.placement,
                              sparse.stats.fingerprint(), tuple(sorted(current.layer_alphas.items())))
    live, (clean, transfer) = curve.live, curve.at(current.alpha)
    left, middle, right = st.columns(3)
    n = len(live.labels)
    left.metric(f"Clean accuracy ({n} test images, live)", with_interval(clean, n),
                help="In brackets: the 95% Wilson interval, how far the figure could move on other images.")
    middle.metric("Transfer robust accuracy (live)", with_interval(transfer, n),
                  help=f"Adversarial examples crafted once against the base model ({live.attack}); "
                       "the attacker never saw MeanSparse, so this is not adaptive robustness.")
    rows = st.session_state.get("sweeps", {}).get(current.model_id)
    row = nearest(rows["rows"], current.alpha) if rows else None
    if row is None:
        right.metric("Adaptive robust accuracy", "—", help="Run a sweep on the Accuracy page.")
    else:
        right.metric(f"Adaptive robust accuracy, worst case (sweep, alpha {row['alpha']:g})",
                     with_interval(row.get("worst", row["robust"]), rows["n"]),
                     help=f"{rows['attack']} on {rows['n']} images, attacking MeanSparse itself; the lowest "
                          "figure of the attacks the sweep ran.")


def chart_ui(figure, key: str) -> None:
    """A Plotly chart whose camera button (top right) saves it at slide resolution, as PNG or SVG; in the
    presentation layout in larger type."""
    if presenting():
        in_large_type(figure)
    st.plotly_chart(figure, key=key, config=download_config(key, st.session_state.get("figure_format", "png")))


def figure_format_ui() -> None:
    """The format the charts' camera buttons save in, kept for the session across pages."""
    formats = list(EXPORT_FORMATS)
    # A plain key outlives the page (a widget's own state is dropped on pages that do not draw it); the
    # callback runs before the rerun, so the charts above already use the new format.
    st.radio("Charts download as (camera button at a chart's top right)", formats, horizontal=True,
             index=formats.index(st.session_state.get("figure_format", "png")), format_func=str.upper,
             key="figure_format_choice",
             on_change=lambda: st.session_state.update(figure_format=st.session_state["figure_format_choice"]))


@contextmanager
def progress_bar(text: str) -> Iterator[Callable[..., None]]:
    """A progress bar that goes away when the work ends, also when it fails; yields ``update(fraction, text)``."""
    bar = st.progress(0.0, text)
    try:
        yield lambda fraction, label=None: bar.progress(min(max(fraction, 0.0), 1.0), label)
    finally:
        bar.empty()


def to_display(image: torch.Tensor, size: int = 128) -> np.ndarray:
    """A (C, H, W) tensor in [0, 1] as an HxWx3 uint8 array, upscaled with visible pixels."""
    array = (image.detach().cpu().clamp(0, 1) * 255).round().byte()
    if array.shape[0] == 1:
        array = array.expand(3, -1, -1)
    repeat = max(1, size // array.shape[-1])
    return array.repeat_interleave(repeat, 1).repeat_interleave(repeat, 2).permute(1, 2, 0).numpy()


def pixel_image_ui(where, image: torch.Tensor, size: int, caption: str) -> None:
    """``image`` drawn at ``to_display``'s size: without a set width, Streamlit widens an image to its
    caption, so images side by side came out at different sizes."""
    array = to_display(image, size)
    where.image(array, caption=caption, width=array.shape[1])


def bytes_of(write) -> bytes:
    """What ``write(path)`` writes, as bytes (for download buttons)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "out"
        write(path)
        return path.read_bytes()
