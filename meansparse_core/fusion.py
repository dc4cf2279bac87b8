"""Fused kernels: the operator and the statistics pass as one kernel each, and the switches that choose them.

Eagerly, the operator makes four passes over memory (sub, abs, compare, select) and a float64
statistics pass converts, then reduces; on CPUs the broadcasting compare and select and the
reductions over every axis but one are slow (each several times a ReLU of the same tensor).
A fused kernel reads the features once, with the same IEEE operations (float32 and float64 only,
so fused and eager results agree). Two kinds:

- On CPUs the operator is a small C kernel (``native.py``), built once per machine into
  the user's cache folder and loaded in milliseconds, and can include the ReLU that follows it.
- ``torch.compile`` (this module's ``Fused``) does the statistics pass, and the operator where the C
  kernel does not run (GPUs). Compiling costs seconds in every new process even with Inductor's
  on-disk caches warm (``inductor/`` in the user's cache folder; B13 measures it), so it is used where the work is long
  enough to pay, and tensors under ``MIN_ELEMENTS`` stay eager. Where it fails (no C++ compiler),
  the library says so once and stays eager.

Switches: ``MEANSPARSE_FUSED=0`` turns every fused kernel off (PyTorch's operations only);
``MEANSPARSE_COMPILE=0`` never calls ``torch.compile``; ``MEANSPARSE_COMPILE=1`` uses it for the
operator too, instead of the C kernel. Unset, the library chooses as above.

Kernels see features in one canonical shape, (A, C, B) with the channels in the middle (see
``as_rows``), so every layout shares one kernel per dtype and device.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from .paths import inductor_cache

MIN_ELEMENTS = 1 << 16
FUSED = os.environ.get("MEANSPARSE_FUSED", "1") != "0"
COMPILE = os.environ.get("MEANSPARSE_COMPILE")  # "0", "1", or None: the library chooses
# Fused half-precision arithmetic skips the rounding between operations, which can move a value
# across the band's edge: those dtypes stay eager, so every path gives the same answer.
EXACT_DTYPES = (torch.float32, torch.float64)


def compile_enabled() -> bool:
    """Whether ``torch.compile`` may run at all."""
    return FUSED and COMPILE != "0"


def compile_everything() -> bool:
    """``MEANSPARSE_COMPILE=1``: compiled kernels in place of the C kernel, whatever the run's length."""
    return FUSED and COMPILE == "1"


def row_shape(x: torch.Tensor, channel_dim: int) -> tuple[int, int, int] | None:
    """The shape (A, C, B) of ``as_rows(x, channel_dim)``'s view, without making it; None if no view exists."""
    channel_dim %= x.dim()
    shape = x.shape
    if x.is_contiguous():
        # Sizes spelt out, not -1: an empty batch has no size that -1 could stand for.
        return math.prod(shape[:channel_dim]), shape[channel_dim], math.prod(shape[channel_dim + 1:])
    if x.dim() == 4 and channel_dim == 1 and x.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = shape
        return n * h * w, c, 1
    return None


def as_rows(x: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None:
    """``x`` viewed (no copy) as a contiguous (A, C, B) tensor, and the inverse view; None if no view exists.

    Covers (N, C, H, W), channels-last images, tokens (N, L, C) and plain (N, C) features.
    """
    rows = row_shape(x, channel_dim)
    if rows is None:
        return None
    if x.is_contiguous():
        return x.view(rows), lambda y: y.view(x.shape)
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).view(rows), lambda y: y.view(n, h, w, c).permute(0, 3, 1, 2)


_THREAD = threading.local()


@contextmanager
def eager_in_this_thread() -> Iterator[None]:
    """Run every ``Fused`` eagerly in the calling thread (while the block lasts).

    A compiled kernel is guarded on the calling thread's torch thread count: a thread that runs with
    another count (a heavy-job worker of ``jobs.JobQueue``) would compile its own copy, seconds of
    pure-Python work holding the interpreter lock.
    """
    before = getattr(_THREAD, "eager", False)
    _THREAD.eager = True
    try:
        yield
    finally:
        _THREAD.eager = before


class Fused:
    """``fn`` compiled with ``torch.compile`` for inputs big enough to pay; ``fn`` itself otherwise."""

    def __init__(self, fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        self.enabled = compile_enabled()
        self.kernel: Callable | None = None

    def worth_it(self, x: torch.Tensor) -> bool:
        return (self.enabled and x.numel() >= MIN_ELEMENTS and x.dtype in EXACT_DTYPES
                and not torch.compiler.is_compiling() and not getattr(_THREAD, "eager", False))

    def __call__(self, *tensors: torch.Tensor):
        """``fn(*tensors)`` without autograd: callers that need gradients write them out themselves."""
        # Detached plain tensors in one grad mode keep the kernel's guards (grad mode,
        # requires_grad, a view's base) from recompiling it for every caller.
        tensors = tuple(t.detach() for t in tensors)
        with torch.no_grad():
            try:
                if self.kernel is None:
                    inductor_cache()
                    self.kernel = torch.compile(self.fn, dynamic=True, fullgraph=True)
                return self.kernel(*tensors)
            except Exception as exc:  # no compiler, unsupported platform or device: eager is exact too
                self.enabled = False
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                warnings.warn(f"MeanSparse runs {self.name} unfused: torch.compile failed "
                              f"({exc.__class__.__name__}: {first_line}).", RuntimeWarning, stacklevel=2)
                return self.fn(*tensors)
