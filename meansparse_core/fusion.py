"""Fused kernels: the operator and the statistics pass compiled into one kernel each, eager as fallback.

Eagerly, the operator makes four passes over memory (sub, abs, compare, select) and a float64
statistics pass converts, then reduces; on CPUs the broadcasting compare and select and the
reductions over every axis but one are slow (each several times a ReLU of the same tensor).
``torch.compile`` turns each into one kernel that reads the features once, with the same IEEE
operations (float32 and float64 only, so fused and eager results agree). Compiling costs a few
seconds once per process and needs a C++ compiler on CPUs; where it fails, the library says so
once and stays eager. Tensors under ``MIN_ELEMENTS`` (one image on the slider path) stay eager:
there the call overhead dominates. ``MEANSPARSE_FUSED=0`` turns fusion off.

Both kernels see features in one canonical shape, (A, C, B) with the channels in the middle (see
``as_rows``), so every layout shares one compiled kernel per dtype and device.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable

import torch

MIN_ELEMENTS = 1 << 16
# Fused half-precision arithmetic skips the rounding between operations, which can move a value
# across the band's edge: those dtypes stay eager, so every path gives the same answer.
EXACT_DTYPES = (torch.float32, torch.float64)


def as_rows(x: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None:
    """``x`` viewed (no copy) as a contiguous (A, C, B) tensor, and the inverse view; None if no view exists.

    Covers (N, C, H, W), channels-last images, tokens (N, L, C) and plain (N, C) features.
    """
    channel_dim %= x.dim()
    if x.is_contiguous():
        rows = x.view(math.prod(x.shape[:channel_dim]), x.shape[channel_dim], -1)
        return rows, lambda y: y.view(x.shape)
    if x.dim() == 4 and channel_dim == 1 and x.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).view(n * h * w, c, 1), lambda y: y.view(n, h, w, c).permute(0, 3, 1, 2)
    return None


class Fused:
    """``fn`` compiled with ``torch.compile`` for inputs big enough to pay; ``fn`` itself otherwise."""

    def __init__(self, fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]) -> None:
        self.fn = fn
        self.enabled = os.environ.get("MEANSPARSE_FUSED", "1") != "0"
        self.kernel: Callable | None = None

    def worth_it(self, x: torch.Tensor) -> bool:
        return (self.enabled and x.numel() >= MIN_ELEMENTS and x.dtype in EXACT_DTYPES
                and not torch.compiler.is_compiling())

    def __call__(self, *tensors: torch.Tensor):
        """``fn(*tensors)`` without autograd: callers that need gradients write them out themselves."""
        # Detached plain tensors in one grad mode keep the kernel's guards (grad mode,
        # requires_grad, a view's base) from recompiling it for every caller.
        tensors = tuple(t.detach() for t in tensors)
        with torch.no_grad():
            try:
                if self.kernel is None:
                    self.kernel = torch.compile(self.fn, dynamic=True, fullgraph=True)
                return self.kernel(*tensors)
            except Exception as exc:  # no compiler, unsupported platform or device: eager is exact too
                self.enabled = False
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                warnings.warn(f"MeanSparse runs {self.fn.__name__} unfused: torch.compile failed "
                              f"({exc.__class__.__name__}: {first_line}).", RuntimeWarning, stacklevel=2)
                return self.fn(*tensors)
