"""Small file helpers shared by the library: atomic writes, damaged caches and checked weight loading."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import IO, Callable

import torch
from torch import nn


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through a temporary file in the destination folder, then rename over ``path``.

    The rename is atomic on one file system, so a reader (another process, another session) sees
    the old file or the new one, never half a file; a failed write leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class CacheWarning(UserWarning):
    """A cache file was damaged or belonged to something else; it was discarded and will be rebuilt."""


def discard_damaged(path: str | os.PathLike, why: str) -> str:
    """Delete a cache file that cannot be used, warn, and return the warning's sentence.

    Caches only hold what the library can compute again, so deleting is safe; leaving the file
    would make every later run trip over it.
    """
    message = f"Discarded the cache file {path} ({why}); it will be rebuilt."
    Path(path).unlink(missing_ok=True)
    warnings.warn(message, CacheWarning, stacklevel=3)
    return message


def load_weights(model: nn.Module, state_dict: dict, source: str) -> None:
    """``model.load_state_dict`` that fails with one readable sentence naming what does not fit."""
    expected, stored = set(model.state_dict()), set(state_dict)
    missing, unexpected = sorted(expected - stored), sorted(stored - expected)
    if missing or unexpected:
        raise ValueError(
            f"The weights in {source} do not fit {type(model).__name__}: "
            f"missing keys {missing[:8]}, unexpected keys {unexpected[:8]}."
        )
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"The weights in {source} hold NaN or infinite values (in {broken[:4]}); "
                         "use a checkpoint from a training run that did not diverge.")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # same names, other shapes
        raise ValueError(f"The weights in {source} do not fit {type(model).__name__}: {' '.join(str(exc).split())}") from exc


def file_digest(path: str | os.PathLike) -> str:
    """A short SHA-256 of a file's content, to key caches by what a file holds rather than its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]
