"""The sparsified model compiled whole (``torch.compile``), for forward-only work; alpha is a tensor input.

The model is first traced by ``torch.export`` (non-strict: the placement's hooks run as Python), which
gives one graph with a ``meansparse::sparsify`` node per tap and alpha, every per-layer alpha
included, as one tensor input of per-tap thresholds; that graph is compiled with ``fullgraph=True``
(no graph break). Moving a slider or sweeping alpha reuses the same compiled code: nothing is
recompiled. On the CPU each node runs the C kernel; on GPUs Inductor sees PyTorch's operations
(``operator.register_inductor_decompositions``) and fuses them into the surrounding kernels.

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
from torch import nn

from .operator import register_inductor_decompositions
from .paths import inductor_cache
from .sparse_model import SparseModel


class Thresholds(nn.Module):
    """``sparse`` as a module of (images, per-tap alphas): what ``torch.export`` traces."""

    def __init__(self, sparse: SparseModel) -> None:
        super().__init__()
        self.sparse = sparse
        self.names = [t.name for t in sparse.taps]

    def forward(self, x: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        return self.sparse(x, 0.0, "exact", dict(zip(self.names, alphas.unbind())))


def export_with_thresholds(sparse: SparseModel, example: torch.Tensor) -> "torch.export.ExportedProgram":
    """``sparse`` traced on ``example`` as a program of (images, per-tap alphas), the batch size left free."""
    alphas = torch.zeros(len(sparse.taps), device=example.device)
    with torch.no_grad():
        return torch.export.export(Thresholds(sparse).eval(), (example, alphas), strict=False,
                                   dynamic_shapes=({0: torch.export.Dim.AUTO}, None))


class CompiledModel:
    """``sparse(x, alpha, layer_alphas=...)`` without gradients, compiled once for every alpha."""

    def __init__(self, sparse: SparseModel, backend: str | Callable = "inductor") -> None:
        self.sparse = sparse
        self.names = [t.name for t in sparse.taps]
        self.backend = backend
        self._compiled: dict[tuple, Callable] = {}  # per image shape, dtype and device
        inductor_cache()
        register_inductor_decompositions()

    def _program(self, x: torch.Tensor) -> Callable:
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._compiled:
            module = export_with_thresholds(self.sparse, x).module()
            self._compiled[key] = torch.compile(module, fullgraph=True, dynamic=True, backend=self.backend)
        return self._compiled[key]

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
        return self._program(x)(x, self.thresholds(alpha, layer_alphas).to(x.device))
