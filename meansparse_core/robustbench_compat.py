"""Import RobustBench 1.1.1, as published on PyPI, on a current Python stack.

Why this exists: the registry's robustbench 1.1.1 does two imports that fail on a plain install:
- ``import pkg_resources`` (robustbench/loaders.py), which setuptools >= 81 no longer ships;
  robustbench only calls ``pkg_resources.resource_filename`` to find its own data files.
- ``from autoattack import AutoAttack`` (robustbench/eval.py), while its declared dependency
  ``pyautoattack`` installs that same code under the module name ``pyautoattack``.

The fix only fills holes: a module is provided only when it cannot be imported, so an environment
that has the real ``pkg_resources`` or the upstream ``autoattack`` is used as it is. Remove this
file once robustbench publishes a release that imports cleanly.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path


def _resource_filename(module_name: str, resource: str) -> str:
    """Path of a data file next to a module or inside a package, as pkg_resources resolves it."""
    return str(Path(importlib.util.find_spec(module_name).origin).parent / resource)


def _provide_pkg_resources() -> None:
    if importlib.util.find_spec("pkg_resources") is not None:
        return
    shim = types.ModuleType("pkg_resources", "Stand-in for robustbench: resource_filename only.")
    shim.resource_filename = _resource_filename
    sys.modules["pkg_resources"] = shim


def _provide_autoattack() -> None:
    if importlib.util.find_spec("autoattack") is not None:
        return
    package = importlib.import_module("pyautoattack")
    sys.modules["autoattack"] = package
    for submodule in ("state", "autopgd_base", "fab_pt", "square", "checks", "other_utils"):
        sys.modules[f"autoattack.{submodule}"] = importlib.import_module(f"pyautoattack.{submodule}")


def import_robustbench() -> types.ModuleType:
    """Return the ``robustbench`` module, importable from a plain registry install."""
    if "robustbench" not in sys.modules:
        _provide_pkg_resources()
        _provide_autoattack()
        with warnings.catch_warnings():
            # A real pkg_resources warns that it is deprecated each time robustbench imports it.
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            # Deprecation notices raised by torch and timm internals while robustbench imports them.
            warnings.simplefilter("ignore", FutureWarning)
            importlib.import_module("robustbench")
    return sys.modules["robustbench"]
