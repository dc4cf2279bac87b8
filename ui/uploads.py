"""An image the user uploads instead of picking one from the gallery."""

from __future__ import annotations

import hashlib

import streamlit as st

from meansparse_core.data import load_image
from meansparse_core.workbench import LIMITS
from ui.state import Picked, Setup, pick


def upload_ui(current: Setup) -> None:
    """An uploaded photo, resized for the model; the user names its true class."""
    upload = st.file_uploader("Or upload an image", type=["png", "jpg", "jpeg", "webp", "gif", "bmp"], key="image_upload")
    if upload is None:
        return
    data = upload.getvalue()
    try:
        image = load_image(data, current.spec.input_size, LIMITS.image_pixels)
    except ValueError as exc:  # the rest of the page keeps working on the previous image
        st.error(str(exc))
        return
    names = current.spec.class_names
    label = st.selectbox("True class of the upload", range(len(names)), format_func=lambda i: names[i],
                         key="upload_label")
    key = f"upload/{hashlib.sha256(data).hexdigest()[:16]}/{label}"
    if st.session_state.get("last_upload") != key:  # a new file or label; gallery picks win otherwise
        st.session_state["last_upload"] = key
        pick(Picked(key, image, label, f"{upload.name} (as {names[label]})"))
