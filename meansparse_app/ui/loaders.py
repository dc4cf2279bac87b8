"""Cached loaders, shared by every session and only ever read.

Models, statistics and data are cached once per server (``st.cache_resource``): alpha travels with
each call, so sessions never see each other's choices.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import streamlit as st
import torch
from torch.utils.data import Dataset

from meansparse_core import attach
from meansparse_core.data import load_dataset, load_items, sample_indices
from meansparse_core.models import ModelSpec, find_model, load_checkpoint, load_model, robustbench_models
from meansparse_core.sparse_model import SparseModel
from meansparse_core.attack_choice import AttackChoice
from meansparse_core.limits import LIMITS
from meansparse_core.jobs import start_in_background
from meansparse_core.paths import cache_folder
from meansparse_core.live_accuracy import LiveAccuracy, LiveCurve
from meansparse_core.statistics_lookup import find_statistics


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
def cached_statistics(choice: ModelChoice, data: str, placement: str):
    return find_statistics(choice.spec, cached_model(choice), data, choice.weights_digest, placement=placement)


@st.cache_resource(max_entries=8)
def cached_sparse(choice: ModelChoice, data: str, placement: str) -> SparseModel | None:
    """The shared sparsified view of the cached model; it holds no alpha, so sessions cannot collide."""
    found = cached_statistics(choice, data, placement)
    return attach(cached_model(choice), found.stats) if found else None


def forget_statistics(choice: ModelChoice, data: str, placement: str) -> None:
    """Forget the statistics (and the sparsified model) of one model, data and placement, after new ones
    were written for them; other sessions' models and statistics stay cached."""
    cached_statistics.clear(choice, data, placement)
    cached_sparse.clear(choice, data, placement)


@st.cache_resource(show_spinner="Reading the dataset...", max_entries=4)
def cached_dataset(data: str, root: str, split: str) -> Dataset:
    return load_dataset(data, split, root or None, fetch=False)


@st.cache_resource(show_spinner="Crafting the live evaluation set (once per model)...", max_entries=4)
def cached_live_set(choice: ModelChoice, data: str, root: str, eps: float, placement: str) -> LiveAccuracy:
    dataset = cached_dataset(data, root, "test")
    indices = sample_indices(len(dataset), LIMITS.live_set, seed=0)
    images, labels = load_items(dataset, indices)
    sparse = cached_sparse(choice, data, placement)
    # The base model: a released model's own MeanSparse layers switched off, not run at their threshold.
    base = sparse.base if sparse is not None else cached_model(choice)
    return LiveAccuracy.craft(base, images.to(choice.device), labels.to(choice.device),
                              AttackChoice(eps=eps, target="base"), indices=indices)


@st.cache_resource(show_spinner=False, max_entries=16, on_release=LiveCurve.close)
def cached_live_curve(choice: ModelChoice, data: str, root: str, eps: float, placement: str, statistics: str,
                      layer_alphas: tuple[tuple[str, float], ...] = ()) -> LiveCurve:
    """The live figures at every alpha, shared by the whole server.

    ``statistics`` (their fingerprint) is part of the key: after a calibration the figures are new ones.
    Without per-layer alphas a background thread scores every slider value ahead of the class (about a
    minute or two of one core, at lower priority than the pages); with them, each alpha is scored when
    asked for. The figures are kept in the cache folder, so a restarted server has them at once."""
    curve = LiveCurve(cached_live_set(choice, data, root, eps, placement), cached_sparse(choice, data, placement),
                      dict(layer_alphas), keep_in=cache_folder("results"))
    if not layer_alphas:
        start_in_background(lambda: curve.fill(LIMITS.slider_alphas()), curve.close, name="live-curve")
    return curve


@st.cache_data(show_spinner=False, max_entries=64)
def cached_zoo(dataset: str | None, threat: str | None, search: str) -> list[ModelSpec]:
    return robustbench_models(dataset, threat, search)
