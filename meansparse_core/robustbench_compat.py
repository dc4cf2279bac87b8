"""Import and run RobustBench 1.1.1, as published on PyPI, on a current Python stack.

Why this exists: the registry's robustbench 1.1.1 does two imports that fail on a plain install:
- ``import pkg_resources`` (robustbench/loaders.py), which setuptools >= 81 no longer ships;
  robustbench only calls ``pkg_resources.resource_filename`` to find its own data files.
- ``from autoattack import AutoAttack`` (robustbench/eval.py), while its declared dependency
  ``pyautoattack`` 0.2.0 installs a reworked copy of AutoAttack under the module name
  ``pyautoattack``, with another API (see ``_UpstreamAutoAttack``), so ``robustbench.eval.benchmark``
  cannot call it as it is.

And RobustBench reads CIFAR only through torchvision's downloader, which checks the files of the
official archive; ``benchmark(..., data_dir=FOLDER)`` here also reads an ImageFolder tree
(``FOLDER/test/<class>/*.png``), the local folders the rest of the project reads.

The fix only fills holes: a module is provided only when it cannot be imported, so an environment
that has the real ``pkg_resources`` or the upstream ``autoattack`` is used as it is, and a data
folder in torchvision's layout goes to RobustBench's own loader. Remove this file once robustbench
publishes a release that imports and runs cleanly.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
import warnings
from pathlib import Path
from typing import Callable


def _resource_filename(module_name: str, resource: str) -> str:
    """Path of a data file next to a module or inside a package, as pkg_resources resolves it."""
    return str(Path(importlib.util.find_spec(module_name).origin).parent / resource)


def _provide_pkg_resources() -> None:
    if importlib.util.find_spec("pkg_resources") is not None:
        return
    shim = types.ModuleType("pkg_resources", "Stand-in for robustbench: resource_filename only.")
    shim.resource_filename = _resource_filename
    sys.modules["pkg_resources"] = shim


def _upstream_autoattack(reworked: type) -> type:
    """pyautoattack 0.2.0's ``AutoAttack`` under the upstream ``autoattack`` API that robustbench calls.

    What differs: upstream's constructor takes ``attacks_to_run``, ``verbose``, ``is_tf_model`` and
    ``log_path`` (positional-or-keyword); 0.2.0 takes ``attacks`` (keyword-only), logs through the
    ``logging`` module and knows none of the other three. Upstream's ``run_standard_evaluation(x, y,
    bs=250, return_labels=False, state_path=None)`` returns the adversarial images (and labels on
    request); 0.2.0's takes ``batch_size`` instead of ``bs`` and always returns (images, labels).
    """

    class UpstreamAutoAttack(reworked):
        def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True, attacks_to_run=(),
                     version="standard", is_tf_model=False, device="cuda", log_path=None):
            if is_tf_model:
                raise ValueError("pyautoattack runs PyTorch models only.")
            super().__init__(model, attacks=list(attacks_to_run) or None, device=device, eps=eps, norm=norm,
                             seed=seed, version=version)
            self.verbose = verbose
            if log_path is not None:  # upstream writes its log there; 0.2.0 logs to a named logger
                self.logger.addHandler(logging.FileHandler(log_path))

        def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False, state_path=None):
            images, labels = super().run_standard_evaluation(x_orig, y_orig, batch_size=bs, state_path=state_path)
            return (images, labels) if return_labels else images

    return UpstreamAutoAttack


def _provide_autoattack() -> None:
    if importlib.util.find_spec("autoattack") is not None:
        return
    package = importlib.import_module("pyautoattack")
    shim = types.ModuleType("autoattack", "pyautoattack under the upstream autoattack API (robustbench_compat).")
    shim.AutoAttack = _upstream_autoattack(package.AutoAttack)
    sys.modules["autoattack"] = shim
    for submodule in ("state", "autopgd_base", "fab_pt", "square", "checks", "other_utils"):
        module = importlib.import_module(f"pyautoattack.{submodule}")
        setattr(shim, submodule, module)
        sys.modules[f"autoattack.{submodule}"] = module


def _reading_image_folders(robustbench_loader: Callable, dataset_key: str) -> Callable:
    """RobustBench's CIFAR test-set loader, reading an ImageFolder tree under ``data_dir`` when there is one."""

    def load(n_examples: int | None, data_dir: str, prepr: Callable):
        root = Path(data_dir)
        if not any((root / folder / "test").is_dir() for folder in ("", "cifar10-jpeg", "cifar100-jpeg")):
            return robustbench_loader(n_examples, data_dir, prepr)
        from robustbench.data import _load_dataset

        from .data import load_dataset

        # The folder's images are 32x32 already, so they need no preprocessing (RobustBench's is ToTensor).
        return _load_dataset(load_dataset(dataset_key, "test", root, fetch=False), n_examples)

    return load


def _provide_local_cifar() -> None:
    from robustbench import data
    from robustbench.model_zoo.enums import BenchmarkDataset

    for dataset, key in ((BenchmarkDataset.cifar_10, "cifar10"), (BenchmarkDataset.cifar_100, "cifar100")):
        data._clean_dataset_loaders[dataset] = _reading_image_folders(data._clean_dataset_loaders[dataset], key)


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
        _provide_local_cifar()
    return sys.modules["robustbench"]
