"""Model sources behind one registry: bundled demo models, the RobustBench zoo, user checkpoints.

Every model takes images in [0, 1] (normalisation lives inside the model, as in RobustBench) and
is returned in eval mode. A ``ModelSpec`` says what a model expects; ``load_model`` builds it.

- ``bundled/<name>``: the project's own models in ``meansparse_core/assets/`` (``<name>.json`` describes each one),
  usable with no network;
- ``robustbench/<dataset>/<threat>/<name>``: any RobustBench entry, read from a local model folder
  in RobustBench's layout (``<dir>/<dataset>/<threat>/<name>.pt``) or downloaded there first;
- a user's checkpoint for a known architecture, loaded with ``weights_only=True``.

Example::

    spec = find_model("robustbench/cifar10/Linf/Standard")
    model = load_model(spec, model_dir="models")
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .files import load_weights
from .paths import models_root
from .data import DATASETS, DataUnavailable, Preparation, Progress, download
from .robustbench_compat import import_robustbench

#: The bundled demo models; MEANSPARSE_ASSETS points elsewhere (a training session's own bundle, say).
ASSETS = Path(os.environ.get("MEANSPARSE_ASSETS") or Path(__file__).resolve().parent / "assets")
#: Which bundled model stands for its dataset, best first: the GPU-trained CIFAR-10 model once its
#: files are in meansparse_core/assets/, else the CPU-trained one (which stays as the small option).
PREFERRED_BUNDLED = ("cifar-resnet9-w64", "cifar-resnet9", "digits-cnn")
GDRIVE_URL = "https://drive.google.com/uc?export=download&confirm=t&id={}"
_ROBUSTBENCH_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet": "imagenet"}
#: RobustBench's names for the ImageNet preprocessings a photo is given here.
_ROBUSTBENCH_PREPARATIONS = {"Res256Crop224": Preparation(256, "bilinear"),
                             "BicubicRes256Crop224": Preparation(256, "bicubic")}
#: A model up to this many parameters is attacked live on a laptop CPU: ResNet-50's 25.6M is about the
#: most for which PGD-10 on one 224x224 image takes seconds, not minutes (BENCHMARKS.md, B10).
LAPTOP_PARAMETERS = 30_000_000


class ModelUnavailable(RuntimeError):
    """The weights are neither on disk nor downloadable; the message says which file to put where."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model is and what it expects."""

    key: str
    label: str
    source: str  # "bundled" | "robustbench"
    name: str
    dataset: str  # key into meansparse_core.data.DATASETS
    threat_model: str  # "Linf", "L2" or "corruptions"

    @property
    def input_size(self) -> tuple[int, int, int]:
        return DATASETS[self.dataset].image_size

    @property
    def num_classes(self) -> int:
        return DATASETS[self.dataset].num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the output classes (ImageNet's come with torchvision; nothing is downloaded)."""
        return DATASETS[self.dataset].class_names

    @property
    def preparation(self) -> Preparation:
        """How a photo of any size becomes this model's input.

        RobustBench's own preprocessing for its ImageNet entries (``Res256Crop224`` or its bicubic
        twin); the dataset's for the others. The few RobustBench evaluates at another size
        (``Wong2020Fast``'s 288x288 crop, ``Res224``'s squeeze) get the dataset's 224x224 crop too,
        since every ImageNet model here takes 224x224 inputs.
        """
        if self.source == "robustbench":
            name = _zoo()[(self.dataset, self.threat_model)][self.name].get("preprocessing")
            if name in _ROBUSTBENCH_PREPARATIONS:
                return _ROBUSTBENCH_PREPARATIONS[name]
        return DATASETS[self.dataset].preparation

    #: Every model takes [0, 1] images: its normalisation is part of the model, as in RobustBench.
    normalization = "inside the model"


# --- bundled ---------------------------------------------------------------------------------


def _bundled_manifests() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(ASSETS.glob("*.json"))}


def bundled_models() -> list[ModelSpec]:
    """The demo models shipped in ``meansparse_core/assets/``."""
    return [
        ModelSpec(f"bundled/{name}", m["label"], "bundled", name, m["dataset"], m["threat_model"])
        for name, m in _bundled_manifests().items()
    ]


def preferred_bundled(dataset: str) -> ModelSpec | None:
    """The bundled model the app opens on for ``dataset`` (``PREFERRED_BUNDLED`` order), or None if none has it."""
    specs = {s.name: s for s in bundled_models() if s.dataset == dataset}
    ranked = [specs[name] for name in PREFERRED_BUNDLED if name in specs] + list(specs.values())
    return ranked[0] if ranked else None


def bundled_statistics_path(spec: ModelSpec) -> Path | None:
    """The statistics shipped with a bundled model, if any."""
    stats = _bundled_manifests()[spec.name].get("statistics")
    return ASSETS / stats if stats else None


def _load_bundled(spec: ModelSpec) -> nn.Module:
    from .architectures import build_architecture

    manifest = _bundled_manifests()[spec.name]
    model = build_architecture(manifest["architecture"])
    state = torch.load(ASSETS / manifest["weights"], map_location="cpu", weights_only=True)
    load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, manifest["weights"])
    return model


# --- RobustBench -----------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _zoo() -> dict:
    import_robustbench()
    from robustbench.model_zoo import model_dicts

    return {(ds.value, tm.value): entries for ds, by_threat in model_dicts.items() for tm, entries in by_threat.items()}


def robustbench_models(dataset: str | None = None, threat_model: str | None = None,
                       search: str = "") -> list[ModelSpec]:
    """The RobustBench zoo, filtered by dataset, threat model and a case-insensitive name search."""
    specs = []
    for (ds, tm), entries in _zoo().items():
        if ds not in _ROBUSTBENCH_DATASETS or (dataset and ds != dataset) or (threat_model and tm != threat_model):
            continue
        specs.extend(
            ModelSpec(f"robustbench/{ds}/{tm}/{name}", f"{name} ({ds}, {tm})", "robustbench", name, ds, tm)
            for name in entries
            if search.lower() in name.lower()
        )
    return specs


def weight_files(spec: ModelSpec, model_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where RobustBench keeps this model's weights (one file, or one per ensemble member)."""
    base = Path(model_dir or models_root()) / spec.dataset / spec.threat_model / f"{spec.name}.pt"
    ids = _zoo()[(spec.dataset, spec.threat_model)][spec.name]["gdrive_id"]
    return [Path(f"{base}_m{i}.pt") for i in range(len(ids))] if isinstance(ids, list) else [base]


def is_local(spec: ModelSpec, model_dir: str | os.PathLike | None = None) -> bool:
    """True when every weight file of a RobustBench model is already on disk."""
    return spec.source == "bundled" or all(p.exists() for p in weight_files(spec, model_dir))


def _fetch_robustbench(spec: ModelSpec, model_dir: Path, progress: Progress | None) -> None:
    entry = _zoo()[(spec.dataset, spec.threat_model)][spec.name]
    ids = entry["gdrive_id"] if isinstance(entry["gdrive_id"], list) else [entry["gdrive_id"]]
    for file, gdrive_id in zip(weight_files(spec, model_dir), ids):
        if file.exists():
            continue
        if gdrive_id is None:
            raise ModelUnavailable(f"RobustBench publishes no weights file for {spec.name}; it cannot be loaded here.")
        try:
            download(GDRIVE_URL.format(gdrive_id), file, progress=progress)
        except DataUnavailable as exc:
            raise ModelUnavailable(
                f"The weights of {spec.name} are not in {file.parent} and could not be downloaded: "
                f"put the file at {file} (RobustBench's layout)."
            ) from exc


def _load_robustbench(spec: ModelSpec, model_dir: Path, progress: Progress | None) -> nn.Module:
    _fetch_robustbench(spec, model_dir, progress)
    rb = import_robustbench()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return rb.load_model(spec.name, model_dir=model_dir, dataset=spec.dataset, threat_model=spec.threat_model)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as exc:
        # torch.load reads these files with weights_only (torch >= 2.6), so a file that carries
        # code, a damaged file and weights for another architecture all end up here.
        files = ", ".join(str(f) for f in weight_files(spec, model_dir))
        raise ValueError(f"{files} could not be loaded as the weights of {spec.name} ({exc.__class__.__name__}); "
                         "replace it with RobustBench's file.") from exc


# --- one entry point ---------------------------------------------------------------------------


def all_models() -> list[ModelSpec]:
    return bundled_models() + robustbench_models()


def find_model(key: str) -> ModelSpec:
    """The spec for ``key`` (``bundled/<name>`` or ``robustbench/<dataset>/<threat>/<name>``)."""
    source = key.split("/", 1)[0]
    candidates: Iterable[ModelSpec] = bundled_models() if source == "bundled" else robustbench_models()
    for spec in candidates:
        if spec.key == key:
            return spec
    raise KeyError(f"Unknown model {key!r}; `python -m meansparse_core models` lists them.")


def load_model(spec: ModelSpec, model_dir: str | os.PathLike | None = None,
               progress: Progress | None = None) -> nn.Module:
    """The model in eval mode on the CPU, from assets, the local model folder, or a download."""
    loaders: dict[str, Callable[[], nn.Module]] = {
        "bundled": lambda: _load_bundled(spec),
        "robustbench": lambda: _load_robustbench(spec, Path(model_dir or models_root()), progress),
    }
    return loaders[spec.source]().eval()


def load_checkpoint(spec: ModelSpec, path: str | os.PathLike) -> nn.Module:
    """``spec``'s architecture with a user's weights (a state dict, possibly under "state_dict").

    Loaded with ``weights_only=True``: a file that carries code is refused, never run.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{Path(path).name} is not a plain PyTorch weights file ({exc.__class__.__name__}).") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{Path(path).name} holds no state dict of tensors.")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = build_random(spec)
    load_weights(model, state, Path(path).name)
    return model.eval()


def rebuild(architecture: dict) -> nn.Module:
    """The architecture an exported file names (``{"key": model key}``), for ``export.load_sparsified``."""
    return build_random(find_model(architecture["key"]))


@lru_cache(maxsize=None)
def parameter_count(spec: ModelSpec) -> int | None:
    """How many parameters ``spec``'s architecture has, counted on the meta device (no memory, no
    download); None when its builder cannot run there or fetches pretrained weights itself."""
    if spec.source == "robustbench" and not _zoo()[(spec.dataset, spec.threat_model)][spec.name]["gdrive_id"]:
        return None  # built by timm or torchvision with pretrained=True: that would download
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in build_random(spec).parameters())
    except Exception:  # builders that read tensor values; their size stays unknown
        return None


def fits_a_laptop(spec: ModelSpec) -> bool:
    """Whether ``spec`` is small enough to attack live on a laptop's CPU (see ``LAPTOP_PARAMETERS``)."""
    count = parameter_count(spec)
    return count is not None and count <= LAPTOP_PARAMETERS


def build_random(spec: ModelSpec) -> nn.Module:
    """``spec``'s architecture with fresh random weights (no download)."""
    if spec.source == "bundled":
        from .architectures import build_architecture

        return build_architecture(_bundled_manifests()[spec.name]["architecture"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _zoo()[(spec.dataset, spec.threat_model)][spec.name]["model"]()
