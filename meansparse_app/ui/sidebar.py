"""The sidebar: which model, data and statistics, and per-layer alphas; it returns the session's Setup."""

from __future__ import annotations

import os
import tempfile

import streamlit as st
from streamlit.delta_generator import DeltaGenerator
import torch
from torch.utils.data import Dataset

from meansparse_core import Statistics, calibrate
from meansparse_core.batchnorm_statistics import without_training_images
from meansparse_core.paths import cache_folder, data_root, models_root
from meansparse_core.data import DATASETS, DataUnavailable, load_dataset, load_items, sample_indices
from meansparse_core.files import file_digest
from meansparse_core.photos import PhotosUnavailable, available as photos_available
from meansparse_core.models import (LAPTOP_PARAMETERS, ModelSpec, bundled_models, fits_a_laptop,
                                    is_local, load_model, preferred_bundled, weight_files)
from meansparse_core.sparse_model import SparseModel
from meansparse_core.taps import own_layers
from meansparse_core.placement_rules import PLACEMENTS
from meansparse_core.statistics_lookup import statistics_path
from meansparse_app.ui import heavy
from meansparse_app.ui.loaders import (ModelChoice, cached_dataset, cached_model, cached_sparse, cached_statistics, cached_zoo,
                        forget_statistics)
from meansparse_app.ui.panels import progress_bar
from meansparse_app.ui.state import Setup, layer_overrides
from meansparse_app.ui.threshold import chosen, set_controls

ALPHA_STARTED_FOR = "alpha_started_for"  # session key: the model whose published alpha the slider started at


def default_model() -> str:
    """The preferred CIFAR-10 demo model when CIFAR-10 is on this machine, else the offline digits model."""
    digits = preferred_bundled("digits").key
    try:
        cached_dataset("cifar10", str(data_root()), "test")
    except (DataUnavailable, OSError):
        return digits
    cifar = preferred_bundled("cifar10")
    return cifar.key if cifar else digits


def _saved_upload(upload) -> str:
    """An uploaded checkpoint written to disk once per upload (torch.load reads files), named by its digest."""
    saved = st.session_state.get("saved_checkpoint")
    if saved is not None and saved[0] == upload.file_id:
        return saved[1]
    uploads = cache_folder("uploads")
    uploads.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=uploads, suffix=".pt", delete=False) as f:
        f.write(upload.getvalue())
    path = uploads / f"{file_digest(f.name)}.pt"
    os.replace(f.name, path)
    st.session_state["saved_checkpoint"] = (upload.file_id, str(path))
    return str(path)


def model_ui() -> tuple[str, str | None, str]:
    """Which model: (key, uploaded checkpoint path or None, RobustBench model folder)."""
    st.header("Model")
    source = st.radio("Source", ["Demo models", "RobustBench zoo", "Your checkpoint"], horizontal=True,
                      key="model_source", help="Demo models ship with the app and need no network.")
    model_dir = st.text_input("RobustBench model folder", str(models_root()), key="model_dir",
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
    # Only ImageNet models can be too big to attack live on a laptop; counting costs a build each.
    laptop = {s.key for s in specs if fits_a_laptop(s)} if dataset == "imagenet" else set()
    st.caption(f"{len(specs)} model{'' if len(specs) == 1 else 's'}, {len(local)} with weights in {model_dir}"
               + (f"; fits a laptop: up to {LAPTOP_PARAMETERS // 1_000_000}M parameters" if laptop else ""))
    return st.selectbox("Architecture" if with_demo_architectures else "Model", specs, key="zoo_model",
                        format_func=lambda s: ("✓ " if s.key in local else "") + s.name
                        + (" · fits a laptop" if s.key in laptop else ""))


def download_ui(spec: ModelSpec, model_dir: str, main: DeltaGenerator) -> None:
    """Weights that are not on disk yet: say where to put them, and offer the download (in the main pane,
    which stays empty until there is a model)."""
    files = ", ".join(str(p) for p in weight_files(spec, model_dir))
    st.warning(f"The weights of {spec.name} are not on this machine.")
    main.warning(f"The weights of {spec.name} are not on this machine. Put them at {files}, or download them.")
    if main.button("Download the weights", key="download_weights"):
        with main, progress_bar("Downloading...") as update:
            load_model(spec, model_dir, lambda done, total: update(done / max(total, 1), f"{done / 2**20:.0f} MB"))
        st.rerun()
    st.stop()


def data_ui(spec: ModelSpec) -> tuple[str, str, Dataset | None]:
    """Which labelled data: (dataset key, folder, test split or None when it is not on disk)."""
    st.header("Data")
    fitting = [k for k, d in DATASETS.items() if d.image_size == spec.input_size]
    data = st.selectbox("Dataset", fitting, index=fitting.index(spec.dataset) if spec.dataset in fitting else 0,
                        format_func=lambda k: DATASETS[k].label, key=f"data_for_{spec.dataset}")
    root = st.text_input("Data folder", str(data_root()), key="data_root",
                         help="CIFAR: the official python batches, or train/ and test/ ImageFolder trees.")
    try:
        return data, root, cached_dataset(data, root, "test")
    except DataUnavailable as exc:
        st.warning(str(exc))
        if data != "imagenet" and st.button(f"Download {DATASETS[data].label}", key="download_data"):
            with progress_bar("Downloading...") as update:
                load_dataset(data, "test", root, lambda done, total: update(done / max(total, 1)))
            st.rerun()
        st.caption("Without data, the pages work on uploaded images" +
                   (" and the built-in photos." if data == "imagenet" and photos_available() else " only."))
        return data, root, None


def placement_ui(choice: ModelChoice) -> str:
    """Where MeanSparse goes, with one line on what the chosen rule does."""
    if own_layers(cached_model(choice)):
        st.caption("Placement: this model carries the authors' MeanSparse layers; they are its taps.")
        return "released"
    placement = st.radio("Placement", list(PLACEMENTS), horizontal=True, key="placement",
                         help="The paper's text puts MeanSparse in front of every activation; the authors' "
                              "released models also put it on residual sums.")
    st.caption(PLACEMENTS[placement])
    return placement


def statistics_ui(choice: ModelChoice, data: str, root: str, placement: str) -> str:
    """Where the statistics in use come from; offers a calibration run (in the server's job queue) when there are none."""
    calibrated = heavy.collect("calibration")
    if calibrated is not None:
        forget_statistics(*calibrated)
    try:
        found = cached_statistics(choice, data, placement)
    except ValueError as exc:  # no released placement is known for this architecture
        st.warning(str(exc))
        return "none"
    if found is not None and found.discarded:
        st.warning(found.discarded)
    if found is not None:
        st.caption(f"Statistics: {found.origin}.")
        sources_ui(found.stats)
        return found.origin
    st.warning(f"{choice.spec.name} has no MeanSparse statistics for {data} with the {placement} placement yet: "
               "calibrate them on its training split, or estimate them without it.")
    without_training_images_ui(choice, data, placement)
    try:
        train = cached_dataset(data, root, "train")
    except DataUnavailable:
        st.info("Calibration needs the training split on this machine (see Data above).")
        return "none"
    n = st.slider("Calibration images", 100, len(train), min(5000, len(train)), 100, key="calibration_n")
    if st.button("Calibrate", key="calibrate"):
        model = cached_model(choice)
        path = statistics_path(choice.spec, data, choice.weights_digest, placement=placement)

        def calibration(job) -> tuple[ModelChoice, str, str]:
            images, _ = load_items(train, sample_indices(len(train), n, seed=0))
            stats = calibrate(model, (b.to(choice.device) for b in images.split(100)), total=n,
                              progress=lambda done, total: job.report(done, total, f"{done}/{total} images"),
                              meta={"model": choice.key, "data": data, "seed": 0}, placement=placement)
            stats.save(path)
            return choice, data, placement  # what the new statistics replace

        heavy.submit("calibration", f"Calibrating {choice.spec.name} on {n} images", calibration,
                     (choice, data, n, placement))
    heavy.status_ui("calibration")
    return "none"


def sources_ui(stats: Statistics) -> None:
    """Where each tap's statistics come from, for statistics that record it."""
    if not any(t.source for t in stats.taps):
        return
    with st.expander("Where each layer's statistics come from"):
        st.markdown("\n".join(f"- `{t.tap.name}`: {t.source or 'not recorded'}" for t in stats.taps))


def without_training_images_ui(choice: ModelChoice, data: str, placement: str) -> None:
    """A button for statistics with no data set: each tap's BatchNorm, the built-in photos for the others."""
    if not st.button("Estimate without training images", key="estimate_without_data",
                     help="Reads each layer's statistics from the BatchNorm in front of it; layers without one "
                          "are measured on a few built-in photos. An estimate: see the README for what it changes."):
        return
    spec = choice.spec
    try:
        with st.spinner("Reading BatchNorm layers..."):
            stats = without_training_images(cached_model(choice), spec.input_size, spec.preparation, placement,
                                            meta={"model": choice.key, "data": data})
    except (ValueError, PhotosUnavailable) as exc:
        st.error(str(exc))
        return
    stats.save(statistics_path(spec, data, choice.weights_digest, placement=placement))
    forget_statistics(choice, data, placement)
    st.rerun()


def published_alpha_ui(choice: ModelChoice, sparse: SparseModel | None) -> None:
    """Marks the threshold a released model stores; the slider starts there once per model."""
    published = sparse.stats.meta.get("published_alpha") if sparse is not None else None
    if published is None:
        return
    st.caption(f"published: {published:g} (the threshold stored in this model's MeanSparse layers; "
               "alpha 0 switches them off)")
    if st.session_state.get(ALPHA_STARTED_FOR) != choice:
        st.session_state[ALPHA_STARTED_FOR] = choice
        set_controls(alpha=float(published))  # the slider is drawn later, by the page
        st.rerun()


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
    return layer_overrides(sparse)


def device_ui() -> str:
    choices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    return st.selectbox("Device", choices, key="device")


def sidebar_ui() -> Setup:
    """Draw the sidebar and return what it sets up; stops the page until a model is usable."""
    main = st.container()
    alpha, compare_alpha = chosen()
    with st.sidebar:
        key, checkpoint, model_dir = model_ui()
        choice = ModelChoice(key, model_dir, checkpoint, device_ui())
        if choice.spec.source == "robustbench" and not checkpoint and not is_local(choice.spec, model_dir):
            download_ui(choice.spec, model_dir, main)
        cached_model(choice)
        data, root, test_set = data_ui(choice.spec)
        placement = placement_ui(choice)
        origin = statistics_ui(choice, data, root, placement)
        sparse = cached_sparse(choice, data, placement) if origin != "none" else None
        st.header("MeanSparse")
        published_alpha_ui(choice, sparse)
        layer_alphas = layer_alphas_ui(sparse, alpha) if sparse is not None else {}
        st.caption(f"**In use:** {choice.spec.label} · {DATASETS[data].label} · {choice.device}")
        with st.expander("Getting more models and data"):
            st.markdown(
                f"- **RobustBench models**: choose *RobustBench zoo*; weights are read from "
                f"`{model_dir}/<dataset>/<threat>/<name>.pt` or downloaded there (set `MEANSPARSE_MODELS` to move it).\n"
                f"- **CIFAR-10/100**: put the python batches or an ImageFolder tree in `{root}` "
                f"(`MEANSPARSE_DATA` moves it), or press Download.\n"
                "- **ImageNet**: a local `val/<wnid>/*.JPEG` tree under `<data folder>/imagenet`.\n"
                "- **Statistics** are cached in `stats/` of the user's cache folder and reused."
            )
    if sparse is None or not st.session_state.get("sparsify", True):
        alpha, compare_alpha, layer_alphas = 0.0, None, {}
    return Setup(choice, sparse, origin, data, root, test_set, alpha, layer_alphas, placement, compare_alpha)
