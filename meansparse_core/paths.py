"""Where the library reads and writes by default: one folder per user, never the working folder.

Everything it writes goes under the cache folder: ``MEANSPARSE_CACHE`` if set, else
``$XDG_CACHE_HOME/meansparse``, else ``~/.cache/meansparse``. In it:

- ``kernels/``: the operator's C kernel, built once per machine;
- ``inductor/``: ``torch.compile``'s caches (unless ``TORCHINDUCTOR_CACHE_DIR`` is set);
- ``stats/``: calibrated statistics;
- ``results/``: evaluation results and their journals (what makes a run resumable), and the app's live figures;
- ``uploads/``: checkpoints uploaded to the app;
- ``data/``: downloaded datasets, unless ``MEANSPARSE_DATA`` names another folder;
- ``models/``: downloaded RobustBench weights (``<dataset>/<threat>/<name>.pt``), unless
  ``MEANSPARSE_MODELS`` names another folder.

Every function reads the environment when called, so a variable set after import counts.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The user's MeanSparse cache folder (not created here)."""
    chosen = os.environ.get("MEANSPARSE_CACHE")
    if chosen:
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG specification says a relative value is invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "meansparse"


def cache_folder(kind: str) -> Path:
    """One kind of cache: ``kernels``, ``inductor``, ``stats``, ``results`` or ``uploads``."""
    return cache_root() / kind


def data_root() -> Path:
    """Where datasets are looked for and downloaded to."""
    return Path(os.environ.get("MEANSPARSE_DATA") or cache_root() / "data").expanduser()


def models_root() -> Path:
    """Where RobustBench weights are looked for and downloaded to, in RobustBench's layout."""
    return Path(os.environ.get("MEANSPARSE_MODELS") or cache_root() / "models").expanduser()


def inductor_cache() -> str:
    """Point ``torch.compile``'s on-disk caches at the cache folder, unless the user already chose."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_folder("inductor")))
