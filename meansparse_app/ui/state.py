"""What one session is working with, kept in ``st.session_state``: its setup, picked image and attack."""

from __future__ import annotations

from dataclasses import dataclass, field

import streamlit as st
import torch
from torch.utils.data import Dataset

from meansparse_core.data import DATASETS, sample_indices
from meansparse_core.jobs import Job
from meansparse_core.models import ModelSpec
from meansparse_core.sparse_model import SparseModel
from meansparse_core.attack_choice import AttackChoice, opening_attack
from meansparse_core.live_accuracy import LiveAccuracy
from meansparse_core.one_image import Opening, attack_image, found_adversarial, opening_image
from meansparse_app.ui import heavy
from meansparse_app.ui.costs import cached_cost
from meansparse_app.ui.loaders import ModelChoice


@dataclass(frozen=True)
class Setup:
    """The model, data and threshold one session is working with."""

    model: ModelChoice
    sparse: SparseModel | None  # None until statistics exist
    stats_origin: str
    data: str
    data_root: str
    test_set: Dataset | None  # None when the data is not on this machine
    alpha: float
    layer_alphas: dict[str, float] = field(default_factory=dict)
    placement: str = "activations"
    compare_alpha: float | None = None  # the second alpha, when comparing two side by side

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def model_id(self) -> str:
        """Names the weights: the model key, plus the checkpoint digest for uploads."""
        return f"{self.model.key}@{self.model.weights_digest}" if self.model.checkpoint else self.model.key

    @property
    def eps(self) -> float:
        return DATASETS[self.data].linf_eps


def setup() -> Setup:
    """The current session's setup, drawn by ``app.py`` before the page runs."""
    return st.session_state["setup"]


def computation_key(current: Setup) -> tuple:
    """What decides a computation on this setup besides its own settings: the weights, where they run,
    the statistics (their placement included) and the data its test images come from."""
    stats = current.sparse.stats.fingerprint() if current.sparse is not None else None
    return current.model_id, current.model.device, stats, current.data, current.data_root


def require_sparse(current: Setup) -> SparseModel:
    if current.sparse is None:
        st.info("This page needs MeanSparse statistics: calibrate them in the sidebar first.")
        st.stop()
    return current.sparse


def layer_overrides(sparse: SparseModel) -> dict[str, float]:
    """The session's per-layer alphas for the layers this model has."""
    names = {t.name for t in sparse.taps}
    return {k: v for k, v in st.session_state.get("layer_alphas", {}).items() if k in names}


@dataclass(frozen=True)
class Picked:
    """The image a session is looking at."""

    key: str  # "test/<index>" or "upload/<digest>"
    image: torch.Tensor  # (C, H, W) in [0, 1]
    label: int | None  # None for uploads until the user names the class
    caption: str


@st.cache_data(show_spinner=False)
def gallery_order(size: int) -> list[int]:
    """The test images in the gallery's (seeded, shuffled) order."""
    return sample_indices(size, size, seed=0)


def test_image(current: Setup, index: int) -> Picked:
    image, label = current.test_set[index]
    return Picked(f"test/{index}", image, label, f"test image {index} ({current.spec.class_names[label]})")


def pick(picked: Picked) -> None:
    st.session_state["picked"] = picked
    st.session_state.pop("adversarial", None)
    heavy.cancel("attack")  # an attack still waiting for the previous image is not wanted any more


def picked_image(current: Setup) -> Picked:
    """The session's image; the opening image (``opening``) when none is picked yet."""
    picked = st.session_state.get("picked")
    if picked is not None and picked.image.shape == current.spec.input_size:
        return picked
    if current.test_set is None:
        st.info("No labelled data on this machine: upload an image on the Explore page.")
        st.stop()
    pick(test_image(current, opening(current).index))
    return st.session_state["picked"]


#: The opening image is looked for among this many gallery images at most (the digits model resists
#: PGD-10 on its first 13), and for no longer than ``OPENING_SEARCH_S`` by the cost estimate: the search
#: runs once per model and data for the whole server.
OPENING_CANDIDATES, OPENING_SEARCH_S = 64, 5.0


def opening(current: Setup) -> Opening:
    """The image a session opens on: a gallery image the default attack fools (``one_image.opening_image``),
    among as many as the search's budget allows on this device; the gallery's first image without one."""
    choice = default_attack(current)
    one = cached_cost(current.model).seconds(choice.attack, choice.steps)
    order = gallery_order(len(current.test_set))[:min(OPENING_CANDIDATES, int(OPENING_SEARCH_S / one))]
    if current.sparse is None or not order:
        return Opening(gallery_order(len(current.test_set))[0], fools_base=False)
    return _opening(current.model_id, current.data, current.data_root, current.stats_origin, current.placement,
                    choice, tuple(order), current)


@st.cache_resource(show_spinner="Looking for an image the default attack fools...", max_entries=16)
def _opening(model_id: str, data: str, data_root: str, stats_origin: str, placement: str,
             choice: AttackChoice, order: tuple[int, ...], _current: Setup) -> Opening:
    items = [(index, *_current.test_set[index]) for index in order]
    return opening_image(_current.sparse, items, choice)


@dataclass(frozen=True)
class Crafted:
    """An adversarial example and what made it."""

    for_key: tuple[str, str]  # (model id, picked image key)
    choice: AttackChoice
    alpha: float  # the alpha the attacker saw (0 when it attacked the base model)
    image: torch.Tensor
    found: bool = True  # whether it fools the model it attacked

    @property
    def description(self) -> str:
        c = self.choice
        against = "the base model" if c.target == "base" else f"MeanSparse at alpha {self.alpha:g} ({c.grad} gradients)"
        return f"{c.description}, seed {c.seed}, against {against}"


def adversarial(current: Setup, picked: Picked) -> Crafted | None:
    """The session's adversarial example for this model and image, if one was crafted (here or in the queue)."""
    queued = heavy.collect("attack")
    if queued is not None:
        st.session_state["adversarial"] = queued
    crafted: Crafted | None = st.session_state.get("adversarial")
    return crafted if crafted is not None and crafted.for_key == (current.model_id, picked.key) else None


def craft(current: Setup, picked: Picked, choice: AttackChoice) -> Crafted | None:
    """Run the attack on the picked image and remember the result for this session.

    An attack this model does not make quickly (``budget.Cost.quick``, measured on this device) goes to
    the server's job queue instead, where it reports every pass through the model and stops at once when
    cancelled or when the tab closes: None now, and ``adversarial`` picks the result up once it is done.
    """
    alpha = current.alpha if choice.target == "sparse" else 0.0
    sparse, layer_alphas = require_sparse(current), current.layer_alphas

    def attack(job: Job | None = None) -> Crafted:
        progress = None if job is None else (
            lambda done, most: job.report(done, most, f"{done:,} of at most {most:,} passes through the model"))
        image = attack_image(sparse, picked.image, picked.label, choice, alpha, layer_alphas, progress)
        found = found_adversarial(sparse, picked.image, image, picked.label, choice, alpha, layer_alphas)
        return Crafted((current.model_id, picked.key), choice, alpha, image, found)

    request = (*computation_key(current), picked.key, choice, alpha, tuple(sorted(layer_alphas.items())))
    if not cached_cost(current.model).quick(choice.attack, choice.steps):
        heavy.submit("attack", f"{choice.attack} ({choice.effort}) on {picked.caption}", attack, request)
        return None
    with st.spinner(f"Running {choice.attack} ({choice.effort})...", show_time=True):
        crafted = heavy.shared_work().run_here(request, attack)
    st.session_state["adversarial"] = crafted
    return crafted


def pick_live_item(current: Setup, live: LiveAccuracy, position: int) -> None:
    """Pick item ``position`` of the live set with its adversarial example (crafted against the base model)."""
    picked = test_image(current, live.indices[position])
    pick(picked)
    adversarial = live.adversarial[position].cpu()
    found = found_adversarial(require_sparse(current), picked.image, adversarial, picked.label, live.choice)
    st.session_state["adversarial"] = Crafted((current.model_id, picked.key), live.choice, 0.0, adversarial, found)


def default_attack(current: Setup) -> AttackChoice:
    return opening_attack(current.eps)
