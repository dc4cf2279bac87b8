"""Streamlit pieces every page shares: cached loaders, the sidebar, the current image and attack.

Models, statistics and data are cached once per server (``st.cache_resource``) and only ever read:
alpha travels with each call, so sessions never see each other's choices. What one user picked
(image, adversarial example, sweep) lives in ``st.session_state``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import streamlit as st
import torch
from torch.utils.data import Dataset

from meansparse_core import attach, calibrate
from meansparse_core.data import (DATASETS, DEFAULT_ROOT, DataUnavailable, load_dataset, load_image, load_items,
                                  sample_indices)
from meansparse_core.files import file_digest
from meansparse_core.models import (DEFAULT_MODEL_DIR, ModelSpec, ModelUnavailable, bundled_models, find_model,
                                    is_local, load_checkpoint, load_model, robustbench_models, weight_files)
from meansparse_core.placement import SparseModel
from meansparse_core.workbench import LIMITS, AttackChoice, LiveAccuracy, attack_image, find_statistics, nearest, statistics_path

log = logging.getLogger("meansparse_explorer")

#: Errors a user can cause; they are shown as one sentence. Anything else is a bug: logged in full.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, DataUnavailable, ModelUnavailable)
UPLOADS = Path(".cache") / "uploads"
DEFAULT_ALPHA = 0.2


@contextmanager
def shown_errors() -> Iterator[None]:
    """Turn an exception into a readable message on the page instead of a traceback."""
    try:
        yield
    except USER_ERRORS as exc:
        st.error(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc))
    except Exception as exc:  # a bug: say so in one line, keep the details in the server log
        log.exception("unexpected error")
        st.error(f"Something went wrong ({exc.__class__.__name__}: {exc}). The server log has the details.")


# --- cached loaders (shared by all sessions, read-only) ----------------------------------------


class ModelChoice(NamedTuple):
    """Everything that decides which weights are loaded, and where they run."""

    key: str
    model_dir: str
    checkpoint: str | None  # path of an uploaded state dict
    device: str

    @property
    def spec(self) -> ModelSpec:
        return find_model(self.key)

    @property
    def weights_digest(self) -> str | None:
        return Path(self.checkpoint).stem if self.checkpoint else None  # uploads are named by their digest


@st.cache_resource(show_spinner="Loading the model...", max_entries=4)
def cached_model(choice: ModelChoice) -> torch.nn.Module:
    model = load_checkpoint(choice.spec, choice.checkpoint) if choice.checkpoint else load_model(choice.spec, choice.model_dir)
    return model.to(choice.device).eval()


@st.cache_resource(show_spinner="Looking for statistics...", max_entries=8)
def cached_statistics(choice: ModelChoice, data: str):
    return find_statistics(choice.spec, cached_model(choice), data, choice.weights_digest)


@st.cache_resource(max_entries=8)
def cached_sparse(choice: ModelChoice, data: str) -> SparseModel | None:
    """The shared sparsified view of the cached model; it holds no alpha, so sessions cannot collide."""
    found = cached_statistics(choice, data)
    return attach(cached_model(choice), found.stats) if found else None


@st.cache_resource(show_spinner="Reading the dataset...", max_entries=4)
def cached_dataset(data: str, root: str, split: str) -> Dataset:
    return load_dataset(data, split, root or None, fetch=False)


@st.cache_resource(show_spinner="Crafting the live evaluation set (once per model)...", max_entries=4)
def cached_live_set(choice: ModelChoice, data: str, root: str, eps: float) -> LiveAccuracy:
    dataset = cached_dataset(data, root, "test")
    images, labels = load_items(dataset, sample_indices(len(dataset), LIMITS.live_set, seed=0))
    return LiveAccuracy.craft(cached_model(choice), images.to(choice.device), labels.to(choice.device),
                              AttackChoice(eps=eps, target="base"))


@st.cache_data(show_spinner=False, max_entries=2048)
def cached_live_figures(choice: ModelChoice, data: str, root: str, eps: float, alpha: float,
                        layer_alphas: tuple[tuple[str, float], ...]) -> tuple[float, float]:
    """(clean, transfer) accuracy at one threshold, remembered so that revisiting an alpha is free."""
    live = cached_live_set(choice, data, root, eps)
    return live.at(cached_sparse(choice, data), alpha, dict(layer_alphas))


@st.cache_data(show_spinner=False, max_entries=64)
def cached_zoo(dataset: str | None, threat: str | None, search: str) -> list[ModelSpec]:
    return robustbench_models(dataset, threat, search)


# --- what the sidebar sets up ------------------------------------------------------------------


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


def default_model() -> str:
    """The CIFAR-10 demo model when CIFAR-10 is on this machine, else the offline digits model."""
    bundled = {s.dataset: s.key for s in bundled_models()}
    try:
        cached_dataset("cifar10", str(DEFAULT_ROOT), "test")
        return bundled.get("cifar10", bundled["digits"])
    except (DataUnavailable, OSError):
        return bundled["digits"]


def _saved_upload(upload) -> str:
    """An uploaded checkpoint written to disk once per upload (torch.load reads files), named by its digest."""
    saved = st.session_state.get("saved_checkpoint")
    if saved is not None and saved[0] == upload.file_id:
        return saved[1]
    UPLOADS.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=UPLOADS, suffix=".pt", delete=False) as f:
        f.write(upload.getvalue())
    path = UPLOADS / f"{file_digest(f.name)}.pt"
    os.replace(f.name, path)
    st.session_state["saved_checkpoint"] = (upload.file_id, str(path))
    return str(path)


def model_ui() -> tuple[str, str | None, str]:
    """Which model: (key, uploaded checkpoint path or None, RobustBench model folder)."""
    st.header("Model")
    source = st.radio("Source", ["Demo models", "RobustBench zoo", "Your checkpoint"], horizontal=True,
                      key="model_source", help="Demo models ship with the app and need no network.")
    model_dir = st.text_input("RobustBench model folder", str(DEFAULT_MODEL_DIR), key="model_dir",
                              help="Weights are read from <folder>/<dataset>/<threat>/<name>.pt, or downloaded there.")
    if source == "Demo models":
        specs = bundled_models()
        default = default_model()
        index = next(i for i, s in enumerate(specs) if s.key == default)
        spec = st.selectbox("Demo model", specs, index=index, format_func=lambda s: s.label, key="demo_model")
        return spec.key, None, model_dir
    zoo_spec = zoo_ui(model_dir, with_demo_architectures=source == "Your checkpoint")
    if source == "RobustBench zoo":
        return zoo_spec.key, None, model_dir
    upload = st.file_uploader("Checkpoint (a state dict for the architecture above)", type=["pt", "pth", "ckpt"],
                              key="checkpoint", help="Loaded with weights_only=True: files that carry code are refused.")
    if upload is None:
        st.info("Upload a checkpoint (a state dict) for the architecture chosen above.")
        st.stop()
    return zoo_spec.key, _saved_upload(upload), model_dir


def zoo_ui(model_dir: str, with_demo_architectures: bool) -> ModelSpec:
    """Filters and a searchable list over the whole RobustBench zoo; local weights are marked."""
    left, right = st.columns(2)
    datasets = list(DATASETS) if with_demo_architectures else ["cifar10", "cifar100", "imagenet"]
    dataset = left.selectbox("Dataset", datasets, index=datasets.index("cifar10"), key="zoo_dataset")
    threat = right.selectbox("Threat model", ["Linf", "L2", "corruptions"], key="zoo_threat")
    search = st.text_input("Search names", "", key="zoo_search")
    specs = cached_zoo(dataset, threat, search)
    if with_demo_architectures:
        specs = [s for s in bundled_models() if s.dataset == dataset and search.lower() in s.key.lower()] + specs
    if not specs:
        st.warning(f"No {dataset} {threat} model matches {search!r}.")
        st.stop()
    local = {s.key for s in specs if is_local(s, model_dir)}
    st.caption(f"{len(specs)} model{'' if len(specs) == 1 else 's'}, {len(local)} with weights in {model_dir}")
    return st.selectbox("Architecture" if with_demo_architectures else "Model", specs, key="zoo_model",
                        format_func=lambda s: ("✓ " if s.key in local else "") + s.name)


def download_ui(spec: ModelSpec, model_dir: str) -> None:
    """Weights that are not on disk yet: say where to put them, and offer the download."""
    files = ", ".join(str(p) for p in weight_files(spec, model_dir))
    st.warning(f"The weights of {spec.name} are not on this machine. Put them at {files}, or download them.")
    if st.button("Download the weights", key="download_weights"):
        bar = st.progress(0.0, "Downloading...")
        load_model(spec, model_dir, lambda done, total: bar.progress(min(done / max(total, 1), 1.0),
                                                                        f"{done / 2**20:.0f} MB"))
        st.rerun()
    st.stop()


def data_ui(spec: ModelSpec) -> tuple[str, str, Dataset | None]:
    """Which labelled data: (dataset key, folder, test split or None when it is not on disk)."""
    st.header("Data")
    fitting = [k for k, d in DATASETS.items() if d.image_size == spec.input_size]
    data = st.selectbox("Dataset", fitting, index=fitting.index(spec.dataset) if spec.dataset in fitting else 0,
                        format_func=lambda k: DATASETS[k].label, key=f"data_for_{spec.dataset}")
    root = st.text_input("Data folder", str(DEFAULT_ROOT), key="data_root",
                         help="CIFAR: the official python batches, or train/ and test/ ImageFolder trees.")
    try:
        return data, root, cached_dataset(data, root, "test")
    except DataUnavailable as exc:
        st.warning(str(exc))
        if data != "imagenet" and st.button(f"Download {DATASETS[data].label}", key="download_data"):
            bar = st.progress(0.0, "Downloading...")
            load_dataset(data, "test", root, lambda done, total: bar.progress(min(done / max(total, 1), 1.0)))
            st.rerun()
        st.caption("Without data, the pages work on uploaded images only.")
        return data, root, None


def statistics_ui(choice: ModelChoice, data: str, root: str) -> str:
    """Where the statistics in use come from; offers a calibration run with a progress bar when there are none."""
    found = cached_statistics(choice, data)
    if found is not None and found.discarded:
        st.warning(found.discarded)
    if found is not None:
        st.caption(f"Statistics: {found.origin}.")
        return found.origin
    st.warning(f"{choice.spec.name} has no MeanSparse statistics for {data} yet: calibrate them on its training split.")
    try:
        train = cached_dataset(data, root, "train")
    except DataUnavailable:
        st.info("Calibration needs the training split on this machine (see Data above).")
        return "none"
    n = st.slider("Calibration images", 100, len(train), min(5000, len(train)), 100, key="calibration_n")
    if st.button("Calibrate", key="calibrate"):
        images, _ = load_items(train, sample_indices(len(train), n, seed=0))
        bar = st.progress(0.0, "Calibrating...")
        stats = calibrate(cached_model(choice), (b.to(choice.device) for b in images.split(100)), total=n,
                          progress=lambda done, total: bar.progress(done / total, f"{done}/{total} images"),
                          meta={"model": choice.key, "data": data, "seed": 0})
        stats.save(statistics_path(choice.spec, data, choice.weights_digest))
        for cached in (cached_statistics, cached_sparse, cached_live_figures):
            cached.clear()
        st.rerun()
    return "none"


def threshold_ui() -> tuple[bool, float]:
    """MeanSparse on/off and the global alpha."""
    st.header("MeanSparse")
    on = st.toggle("Sparsify", True, key="sparsify")
    alpha = st.slider("alpha (band half-width in standard deviations)", 0.0, 2.0, DEFAULT_ALPHA, 0.01, key="alpha")
    return on, alpha


def layer_alphas_ui(sparse: SparseModel, alpha: float) -> dict[str, float]:
    """Per-layer alphas that override the global one, kept for the session."""
    overrides: dict[str, float] = st.session_state.setdefault("layer_alphas", {})
    with st.expander("Per-layer alpha"):
        layer = st.selectbox("Layer", [t.name for t in sparse.taps], key="override_layer")
        value = st.number_input("alpha for this layer", 0.0, 10.0, overrides.get(layer, alpha), 0.01,
                                key="override_value")
        left, right = st.columns(2)
        if left.button("Set", key="set_override"):
            overrides[layer] = value
        if right.button("Clear all", key="clear_overrides"):
            overrides.clear()
        st.caption(", ".join(f"{k}: {v:g}" for k, v in overrides.items()) or "No overrides: every layer uses alpha.")
    names = {t.name for t in sparse.taps}
    return {k: v for k, v in overrides.items() if k in names}


def device_ui() -> str:
    choices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    return st.selectbox("Device", choices, key="device")


def sidebar_ui() -> Setup:
    """Draw the sidebar and return what it sets up; stops the page until a model is usable."""
    with st.sidebar:
        model_box, threshold_box = st.container(), st.container()
    # The threshold is drawn first, so that it is drawn in every run even when the model part stops
    # early (waiting for an upload, or rerunning after a calibration): Streamlit forgets the value of
    # a widget after a run that did not draw it.
    with threshold_box:
        on, alpha = threshold_ui()
    with model_box:
        key, checkpoint, model_dir = model_ui()
        choice = ModelChoice(key, model_dir, checkpoint, device_ui())
        if choice.spec.source == "robustbench" and not checkpoint and not is_local(choice.spec, model_dir):
            download_ui(choice.spec, model_dir)
        cached_model(choice)
        data, root, test_set = data_ui(choice.spec)
        origin = statistics_ui(choice, data, root)
        sparse = cached_sparse(choice, data)
    with threshold_box:
        layer_alphas = layer_alphas_ui(sparse, alpha) if sparse is not None else {}
        if not on or sparse is None:
            alpha, layer_alphas = 0.0, {}
        st.caption(f"**In use:** {choice.spec.label} · {DATASETS[data].label} · {choice.device}")
        with st.expander("Getting more models and data"):
            st.markdown(
                f"- **RobustBench models**: choose *RobustBench zoo*; weights are read from "
                f"`{model_dir}/<dataset>/<threat>/<name>.pt` or downloaded there (set `MEANSPARSE_MODELS` to move it).\n"
                f"- **CIFAR-10/100**: put the python batches or an ImageFolder tree in `{root}` "
                f"(`MEANSPARSE_DATA` moves it), or press Download.\n"
                "- **ImageNet**: a local `val/<wnid>/*.JPEG` tree under `<data folder>/imagenet`.\n"
                "- **Statistics** are cached under `.cache/stats` and reused."
            )
    return Setup(choice, sparse, origin, data, root, test_set, alpha, layer_alphas)


def setup() -> Setup:
    """The current session's setup, drawn by ``app.py`` before the page runs."""
    return st.session_state["setup"]


def require_sparse(current: Setup) -> SparseModel:
    if current.sparse is None:
        st.info("This page needs MeanSparse statistics: calibrate them in the sidebar first.")
        st.stop()
    return current.sparse


# --- the current image and its adversarial version ---------------------------------------------


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


def gallery_ui(current: Setup, count: int = 8) -> None:
    """A row of test images with labels; a button under each picks it."""
    if current.test_set is None:
        return
    page = st.session_state.get("gallery_page", 0)
    columns = st.columns(count)
    for column, index in zip(columns, gallery_order(len(current.test_set))[page * count:(page + 1) * count]):
        picked = test_image(current, index)
        column.image(to_display(picked.image), caption=current.spec.class_names[picked.label], width="stretch")
        if column.button("Pick", key=f"pick_{index}"):
            pick(picked)
    if st.button("More images", key="gallery_more"):
        st.session_state["gallery_page"] = page + 1
        st.rerun()


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


def pick(picked: Picked) -> None:
    st.session_state["picked"] = picked
    st.session_state.pop("adversarial", None)


def picked_image(current: Setup) -> Picked:
    """The session's image; the first gallery image when none is picked yet."""
    picked = st.session_state.get("picked")
    if picked is not None and picked.image.shape == current.spec.input_size:
        return picked
    if current.test_set is None:
        st.info("No labelled data on this machine: upload an image on the Explore page.")
        st.stop()
    pick(test_image(current, gallery_order(len(current.test_set))[0]))
    return st.session_state["picked"]


@dataclass(frozen=True)
class Crafted:
    """An adversarial example and what made it."""

    for_key: tuple[str, str]  # (model id, picked image key)
    choice: AttackChoice
    alpha: float  # the alpha the attacker saw (0 when it attacked the base model)
    image: torch.Tensor

    @property
    def description(self) -> str:
        c = self.choice
        unit = "" if c.attack == "pgd-l2" else "/255"
        against = "the base model" if c.target == "base" else f"MeanSparse at alpha {self.alpha:g} ({c.grad} gradients)"
        return f"{c.attack} eps {c.eps:g}{unit}, {c.steps} steps, seed {c.seed}, against {against}"


def adversarial(current: Setup, picked: Picked) -> Crafted | None:
    """The session's adversarial example for this model and image, if one was crafted."""
    crafted: Crafted | None = st.session_state.get("adversarial")
    return crafted if crafted is not None and crafted.for_key == (current.model_id, picked.key) else None


def craft(current: Setup, picked: Picked, choice: AttackChoice) -> Crafted:
    """Run the attack on the picked image and remember the result for this session."""
    alpha = current.alpha if choice.target == "sparse" else 0.0
    with st.spinner(f"Running {choice.attack} ({choice.steps} steps)...", show_time=True):
        image = attack_image(require_sparse(current), picked.image, picked.label, choice, alpha, current.layer_alphas)
    crafted = Crafted((current.model_id, picked.key), choice, alpha, image)
    st.session_state["adversarial"] = crafted
    return crafted


def default_attack(current: Setup) -> AttackChoice:
    return AttackChoice(attack="pgd", eps=current.eps, steps=10, target="base")


# --- accuracy next to the views ----------------------------------------------------------------


def accuracy_panel_ui(current: Setup) -> None:
    """Clean and transfer accuracy at the current alpha (live), and the last sweep's adaptive figure."""
    sparse = current.sparse
    if sparse is None or current.test_set is None:
        return
    live = cached_live_set(current.model, current.data, current.data_root, current.eps)
    clean, transfer = cached_live_figures(current.model, current.data, current.data_root, current.eps, current.alpha,
                                          tuple(sorted(current.layer_alphas.items())))
    left, middle, right = st.columns(3)
    left.metric(f"Clean accuracy ({LIMITS.live_set} test images, live)", f"{clean:.0%}")
    middle.metric("Transfer robust accuracy (live)", f"{transfer:.0%}",
                  help=f"Adversarial examples crafted once against the base model ({live.attack}); "
                       "the attacker never saw MeanSparse, so this is not adaptive robustness.")
    rows = st.session_state.get("sweeps", {}).get(current.model_id)
    row = nearest(rows["rows"], current.alpha) if rows else None
    if row is None:
        right.metric("Adaptive robust accuracy", "—", help="Run a sweep on the Accuracy page.")
    else:
        right.metric(f"Adaptive robust accuracy (sweep, alpha {row['alpha']:g})", f"{row['robust']:.0%}",
                     help=f"{rows['attack']} on {rows['n']} images, attacking MeanSparse itself.")


# --- drawing helpers ---------------------------------------------------------------------------


def to_display(image: torch.Tensor, size: int = 128) -> np.ndarray:
    """A (C, H, W) tensor in [0, 1] as an HxWx3 uint8 array, upscaled with visible pixels."""
    array = (image.detach().cpu().clamp(0, 1) * 255).round().byte()
    if array.shape[0] == 1:
        array = array.expand(3, -1, -1)
    repeat = max(1, size // array.shape[-1])
    return array.repeat_interleave(repeat, 1).repeat_interleave(repeat, 2).permute(1, 2, 0).numpy()


def bytes_of(write) -> bytes:
    """What ``write(path)`` writes, as bytes (for download buttons)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "out"
        write(path)
        return path.read_bytes()

