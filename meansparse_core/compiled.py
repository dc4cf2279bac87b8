"""The sparsified model compiled whole (``torch.compile``), for forward-only work; alpha is a tensor input.

Compiling the whole model lets Inductor fuse the operator into the surrounding kernels. Alpha,
and every per-layer alpha, reaches the compiled graph as one tensor of per-tap thresholds, so
moving a slider or sweeping alpha reuses the same compiled code: nothing is recompiled.

When it pays (measured in BENCHMARKS.md, B1 and B13): a new process spends seconds importing the
compiler and compiling, even with Inductor's caches warm, and Inductor's own convolution and
normalisation kernels may round differently from PyTorch's eager ones, so logits can differ in
the last bits. The library therefore uses it only when asked (``MEANSPARSE_COMPILE=1``, or by
calling it), e.g. in a long-lived server scoring a fixed set at many alphas. Example::

    fast = CompiledModel(attach(model, stats))
    logits = fast(images, alpha=0.25)                   # compiles once
    logits = fast(images, alpha=0.3, layer_alphas={"layer1.0.relu": 0.0})   # same compiled code
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from .paths import inductor_cache
from .sparse_model import SparseModel


class CompiledModel:
    """``sparse(x, alpha, layer_alphas=...)`` without gradients, compiled once for every alpha."""

    def __init__(self, sparse: SparseModel, backend: str | Callable = "inductor") -> None:
        self.sparse = sparse
        self.names = [t.name for t in sparse.taps]
        inductor_cache()
        self._compiled = torch.compile(self._logits, dynamic=True, backend=backend)

    def _logits(self, x: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        return self.sparse(x, 0.0, "exact", dict(zip(self.names, alphas.unbind())))

    def thresholds(self, alpha: float, layer_alphas: Mapping[str, float] | None = None) -> torch.Tensor:
        """The per-tap alphas as the tensor the compiled graph takes, checked as ``sparsify`` checks them."""
        layer_alphas = layer_alphas or {}
        unknown = set(layer_alphas) - set(self.names)
        if unknown:
            raise KeyError(f"No tap named {sorted(unknown)[0]!r}; see SparseModel.taps for the names.")
        values = [float(layer_alphas.get(name, alpha)) for name in self.names]
        if not all(v >= 0 for v in values):  # also refuses NaN
            raise ValueError(f"alpha must be a number >= 0, got {min(values, key=lambda v: v >= 0)}.")
        return torch.tensor(values, dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, alpha: float, layer_alphas: Mapping[str, float] | None = None) -> torch.Tensor:
        return self._compiled(x, self.thresholds(alpha, layer_alphas).to(x.device))
