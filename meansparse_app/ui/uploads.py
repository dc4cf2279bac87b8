"""A photo the user uploads instead of picking one from the gallery, and its true class (or none)."""

from __future__ import annotations

import hashlib
from typing import Sequence

import streamlit as st

from meansparse_core.data import load_image
from meansparse_core.limits import LIMITS
from meansparse_app.ui.panels import to_display
from meansparse_app.ui.state import Picked, Setup, pick

UNKNOWN_CLASS = "unknown: judge the models against the base model's prediction"


def upload_ui(current: Setup) -> None:
    """An uploaded photo of any size, prepared as the model expects, shown as the model sees it."""
    upload = st.file_uploader("Or upload a photo", type=["png", "jpg", "jpeg", "webp", "gif", "bmp"],
                              key="image_upload", help="Any size and shape; phone photos are turned upright.")
    if upload is None:
        return
    data = upload.getvalue()
    spec = current.spec
    try:
        image = load_image(data, spec.input_size, LIMITS.image_pixels, spec.preparation)
    except ValueError as exc:  # the rest of the page keeps working on the previous image
        st.error(str(exc))
        return
    left, right = st.columns([1, 4])
    left.image(to_display(image, 128), caption="what the model sees")
    with right:
        st.caption(f"{upload.name}: {spec.preparation.describe(spec.input_size)}, as {spec.name} expects.")
        label = true_class_ui(spec.class_names, spec.dataset)
    known = "true class unknown" if label is None else f"as {spec.class_names[label]}"
    key = f"upload/{hashlib.sha256(data).hexdigest()[:16]}/{label}"
    if st.session_state.get("last_upload") != key:  # a new file or label; gallery picks win otherwise
        st.session_state["last_upload"] = key
        pick(Picked(key, image, label, f"{upload.name} ({known})"))


def true_class_ui(names: Sequence[str], dataset: str) -> int | None:
    """The photo's true class from a list searchable by typing, or None (the default): unknown.

    Nothing is assumed: with no class named, the verdict judges both models against the base
    model's prediction on the clean photo instead of claiming a true class.
    """
    return st.selectbox("True class of the photo (type to search)", [None, *range(len(names))],
                        format_func=lambda i: UNKNOWN_CLASS if i is None else names[i],
                        key=f"upload_label_{dataset}")  # one per class list: options differ by dataset
