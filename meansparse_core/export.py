"""Save a sparsified model as one file, load it back ready to run, and export standalone programs.

A sparsified-model file is a ``torch.save`` of plain containers only, so that
``torch.load(path, weights_only=True)`` reads it and a hostile file cannot run code::

    {"format": "meansparse-sparsified-model", "version": 1,
     "torch_version": str,                       # the torch that wrote it, for diagnosis only
     "architecture": {str: plain values},        # how to rebuild the nn.Module; read by `build`
     "state_dict": {str: tensor},                # the model's own, unsparsified weights
     "statistics": {...},                        # exactly Statistics.save's payload
     "alpha": float, "layer_alphas": {str: float},
     "taps": [{"name": str, "kind": str, "channel_dim": int, "channels": int}, ...]}

Rebuilding the architecture is the caller's business (``build``), so this module does not depend
on any model registry. Example::

    save_sparsified("cifar_ms.pt", model, stats, alpha=0.25,
                    architecture={"source": "bundled", "name": "toy"})
    loaded = load_sparsified("cifar_ms.pt", build=my_registry_build)
    logits = loaded.module(x)
    export_program(loaded.module, x, "cifar_ms.pt2")   # torch.export.load(...).module()(x)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .files import atomic_write, load_weights
from .operator import DECOMPOSITIONS, GRAD_MODES, GradMode
from .sparse_model import FixedAlpha, SparseModel, attach
from .taps import Tap
from .statistics import Statistics

FORMAT = "meansparse-sparsified-model"
VERSION = 1

Build = Callable[[dict], nn.Module]


@dataclass
class LoadedSparsified:
    """A sparsified model read from disk; ``module(x)`` gives the logits at the stored alpha."""

    module: FixedAlpha
    sparse: SparseModel
    model: nn.Module
    stats: Statistics
    alpha: float
    layer_alphas: dict[str, float]
    architecture: dict


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything that weights_only loading could not read back (or that could run code)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has a non-string key {key!r}; use plain string keys.")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise ValueError(f"{where} holds a {type(value).__name__}; only str, int, float, bool, None, lists and dicts are allowed.")


def _check_alpha(alpha: float, where: str) -> float:
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"{where} must be a finite number >= 0, got {alpha}.")
    return alpha


def _tap_record(tap: Tap) -> dict:
    return {"name": tap.name, "kind": tap.kind, "channel_dim": tap.channel_dim, "channels": tap.channels}


def save_sparsified(
    path: str | os.PathLike,
    model: nn.Module,
    stats: Statistics,
    alpha: float,
    layer_alphas: Mapping[str, float] | None = None,
    *,
    architecture: dict,
) -> None:
    """Write ``model``'s weights, ``stats``, alpha and how to rebuild the model to one file.

    ``architecture`` is a dict of plain values (e.g. ``{"source": "robustbench", "name":
    "Standard", "dataset": "cifar10", "threat_model": "Linf"}``) handed to ``build`` on loading.
    ``model`` is the plain model; a ``SparseModel`` or ``FixedAlpha`` is unwrapped to it.
    """
    # Accept the wrappers too: their own state_dict would carry "wrapped." prefixes and operator
    # buffers that the rebuilt architecture does not have.
    if isinstance(model, FixedAlpha):
        model = model.sparse
    if isinstance(model, SparseModel):
        model = model.wrapped
    if not isinstance(architecture, dict) or not architecture:
        raise ValueError("architecture must be a non-empty dict saying how to rebuild the model.")
    _check_plain(architecture, "architecture")
    alpha = _check_alpha(alpha, "alpha")
    tap_names = {t.name for t in stats.tap_list}
    layer_alphas = {str(k): _check_alpha(v, f"layer_alphas[{k!r}]") for k, v in (layer_alphas or {}).items()}
    unknown = sorted(set(layer_alphas) - tap_names)
    if unknown:
        # Caught now rather than at the first forward pass after loading.
        raise KeyError(f"No tap named {unknown[0]!r} in the statistics; see Statistics.tap_list for the names.")

    state_dict = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": str(torch.__version__),
        "architecture": dict(architecture),
        "state_dict": state_dict,
        "statistics": stats.to_payload(),
        "alpha": alpha,
        "layer_alphas": layer_alphas,
        "taps": [_tap_record(t) for t in stats.tap_list],
    }
    atomic_write(Path(path), lambda f: torch.save(payload, f))


def _read_payload(path: str | os.PathLike) -> dict:
    try:
        # weights_only refuses any pickled global that is not a tensor or plain container, before
        # anything is constructed, so a hostile file cannot run code here.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a safely readable MeanSparse model file ({first_line}).") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a MeanSparse sparsified-model file.")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path} has sparsified-model format version {payload.get('version')}, but this version reads {VERSION}.")
    missing = [k for k in ("architecture", "state_dict", "statistics", "alpha", "layer_alphas", "taps") if k not in payload]
    if missing:
        raise ValueError(f"{path} is an incomplete MeanSparse model file (missing {', '.join(missing)}).")
    return payload


def load_sparsified(path: str | os.PathLike, build: Build, grad: GradMode = "exact") -> LoadedSparsified:
    """Read a file written by ``save_sparsified`` and return the model sparsified at its alpha.

    ``build(architecture)`` must return a fresh ``nn.Module`` of the stored architecture; its
    weights are then replaced strictly by the stored ones. The model is put in eval mode and lives
    on the CPU (``loaded.module.to(device)`` moves weights and statistics together).
    """
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}.")
    payload = _read_payload(path)
    architecture = payload["architecture"]
    stats = Statistics.from_payload(payload["statistics"], f"the statistics in {path}")
    # The tap list is stored twice (placement and statistics); disagreement means a corrupt file.
    if [_tap_record(t) for t in stats.tap_list] != payload["taps"]:
        raise ValueError(f"{path} is inconsistent: its tap list does not match its statistics.")

    model = build(dict(architecture))
    if not isinstance(model, nn.Module):
        raise TypeError(f"build returned a {type(model).__name__}, not an nn.Module.")
    load_weights(model, payload["state_dict"], str(path))
    model.eval()

    alpha = _check_alpha(payload["alpha"], "the stored alpha")
    layer_alphas = {k: _check_alpha(v, f"the stored alpha of {k!r}") for k, v in payload["layer_alphas"].items()}
    sparse = attach(model, stats)
    module = sparse.at(alpha, grad, layer_alphas)
    return LoadedSparsified(module, sparse, model, stats, alpha, layer_alphas, dict(architecture))


def export_program(
    model_fixed_alpha: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    dynamic_batch: bool = True,
) -> "torch.export.ExportedProgram":
    """Write a ``torch.export`` program that runs with PyTorch alone: ``torch.export.load(path).module()(x)``.

    ``model_fixed_alpha`` is typically ``sparse.at(alpha)`` or ``load_sparsified(...).module``; it
    is traced in its current train/eval mode on ``example``. With ``dynamic_batch`` the batch size
    is left free where the model allows it (use an example batch of at least 2). The program is
    checked against the eager module on ``example`` before it is written. Raises ``ValueError``
    when the architecture cannot be traced (e.g. Python control flow on tensor values).
    """
    # Non-strict export runs the Python forward with fake tensors, so our forward hooks, the
    # ContextVar and the TorchFunctionMode all run as usual and the MeanSparse operations land in
    # the graph with the statistics as buffers. Strict (Dynamo) export cannot trace ContextVar.set.
    # The positional form of dynamic_shapes does not depend on the name of forward's argument.
    # Dim.AUTO leaves the batch free where the model allows it and specialises it silently where
    # the model fixes it (or where the example batch is 1), instead of failing the export.
    dynamic_shapes = ({0: torch.export.Dim.AUTO},) if dynamic_batch else None
    try:
        program = torch.export.export(model_fixed_alpha, (example,), strict=False, dynamic_shapes=dynamic_shapes)
        # The operator as PyTorch's own operations: loading the program needs no meansparse::sparsify.
        program = program.run_decompositions(DECOMPOSITIONS)
    except Exception as exc:
        raise _not_exportable(exc) from exc

    with torch.no_grad():
        expected = model_fixed_alpha(example)
        got = program.module()(example)
    if not (isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)):
        raise ValueError("this architecture cannot be exported as a standalone program: the traced program does not reproduce the model's output.")
    atomic_write(Path(path), lambda f: torch.export.save(program, f))
    return program


def _not_exportable(exc: Exception) -> ValueError:
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return ValueError(f"this architecture cannot be exported as a standalone program: {type(exc).__name__}: {reason}")
