"""What an attack or a sweep will cost on this device, said before it starts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import streamlit as st

from meansparse_core.budget import Cost, measure
from meansparse_core.models import fits_a_laptop
from meansparse_app.ui.loaders import ModelChoice, cached_model

if TYPE_CHECKING:  # ui.state asks this module whether an attack is quick
    from meansparse_app.ui.state import Setup


@st.cache_resource(show_spinner="Timing the model on this device...", max_entries=8)
def cached_cost(choice: ModelChoice) -> Cost:
    """One quick measurement per model and device, shared by every session."""
    return measure(cached_model(choice), choice.spec.input_size)


def cost_ui(current: Setup, attack: str, steps: int, images: int = 1) -> None:
    """The expected time as a caption; a warning instead when it is long enough to stall a lecture."""
    cost = cached_cost(current.model)
    warning = cost.warning(attack, steps, images)
    if warning:
        st.warning(warning)
    else:
        st.caption(cost.describe(attack, steps, images))


def sweep_cost_ui(current: Setup, attack: str, steps: int, images: int) -> None:
    """Before a sweep, on an ImageNet model or one too big for a laptop: the worst case, timed one image at
    a time (small models batch far faster than that, so they get no estimate that would cry wolf)."""
    if current.spec.dataset == "imagenet" or not fits_a_laptop(current.spec):
        cost_ui(current, attack, steps, images)
