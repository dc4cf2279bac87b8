"""The operator as a small C kernel, built once per machine into the user's cache folder.

Why not ``torch.compile`` here: a new process pays for importing TorchDynamo and Inductor and for
tracing the kernel again even when Inductor's on-disk caches hold the compiled code (seconds on
the 2-core development machine: BENCHMARKS.md, B13), which is more than a short ``evaluate``
spends in the operator. This kernel is compiled once by the system C compiler
(about a second), kept in the user's cache folder (``paths.py``) and loaded by later processes in milliseconds.

It reads the features once and writes the result, and can apply the ReLU that follows the
operator in the same pass and write the one-byte mask of the gradients that pass (exact or
straight-through) for the backward pass. Plain IEEE arithmetic in the input's dtype (float32 or
float64, no fast-math), so it gives exactly what the eager PyTorch operations give. Where no C
compiler works, the library says so once and uses PyTorch's operations.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .fusion import FUSED, compile_everything, row_shape
from .paths import cache_folder

SOURCE = Path(__file__).with_name("meansparse_kernels.c")
# -O3 vectorises the loops (-fno-trapping-math lets it vectorise the comparisons too); no
# -ffast-math, which would change how values round and compare. 256-bit vectors: with 512-bit ones
# the kernel took about 15% longer inside a forward pass on the development CPU (BENCHMARKS.md, B1).
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=256", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_FUNCTIONS = {torch.float32: "meansparse_f32", torch.float64: "meansparse_f64"}
_MASKED = {torch.float32: "meansparse_masked_f32", torch.float64: "meansparse_masked_f64"}
_ARGUMENTS = {**{name: [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 3 for name in _FUNCTIONS.values()},
              **{name: [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int] for name in _MASKED.values()}}

#: False: compiled kernels or PyTorch's operations instead (see fusion.py's switches; benchmarks compare both).
enabled = FUSED and not compile_everything()
_library: ctypes.CDLL | None = None
# Values per thread below which a second thread costs more than it saves (PyTorch's own grain size):
# waking a thread takes microseconds, and milliseconds when the other core is busy.
GRAIN = 32768
_failed = False
_lock = threading.Lock()


def _cpu_flags() -> str:
    """What -march=native compiles for: kernels built on another CPU must not be loaded here."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def library_path(cache: Path | None = None) -> Path:
    """Where the built kernel lives (the user's cache folder): keyed by the source, the flags, the compiler and the CPU."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or "cc"
    key = "\n".join([SOURCE.read_text(), " ".join(FLAGS), compiler, platform.machine(), _cpu_flags()])
    return (cache or cache_folder("kernels")) / f"meansparse_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _build(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        built = Path(scratch) / path.name
        subprocess.run([os.environ.get("CC", "cc"), *FLAGS, str(SOURCE), "-o", str(built)],
                       check=True, capture_output=True, text=True)
        os.replace(built, path)  # atomic: a concurrent process sees the whole file or none


def _load() -> ctypes.CDLL | None:
    global _library, _failed
    with _lock:
        if _library is None and not _failed:
            try:
                path = library_path()
                if not path.exists():
                    _build(path)
                library = ctypes.CDLL(str(path))
                for name, arguments in _ARGUMENTS.items():
                    getattr(library, name).argtypes = arguments
                _library = library
            except (OSError, subprocess.CalledProcessError) as exc:
                _failed = True
                detail = getattr(exc, "stderr", None) or str(exc)
                warnings.warn(f"MeanSparse uses PyTorch's operations: its C kernel could not be built or loaded "
                              f"({detail.strip().splitlines()[0] if detail.strip() else exc.__class__.__name__}).",
                              RuntimeWarning, stacklevel=3)
    return _library


def available() -> bool:
    """True when the kernel is switched on and built (building it on first use)."""
    return enabled and _load() is not None


def usable(x: torch.Tensor, channel_dim: int) -> bool:
    """True where the kernel runs ``x``: float32 or float64 on the CPU, in a layout ``as_rows`` can view."""
    return (x.is_cpu and x.dtype in _FUNCTIONS and not torch.compiler.is_compiling()
            and row_shape(x, channel_dim) is not None and available())


def run(x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, channel_dim: int, relu: bool,
        mask: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The operator (then ReLU if ``relu``) on ``x``: (output, mask of passing gradients or None).

    ``x`` must be ``usable``; ``mean`` and ``band`` (alpha * std) are vectors of length C in its
    dtype. ``mask`` is None, "exact" or "straight-through"; None is returned where every gradient
    passes. The output and the mask have ``x``'s memory layout; neither is a view.
    """
    if mask == "straight-through" and not relu:
        mask = None  # the operator alone passes every gradient: nothing to mask
    # Dense layouts only (``usable``), which ``empty_like`` keeps: the output and the mask are laid out
    # as ``x`` is, so the three share one (A, C, B) shape and need no views.
    out = torch.empty_like(x)
    keep = torch.empty_like(x, dtype=torch.bool) if mask is not None else None
    getattr(_library, _FUNCTIONS[x.dtype])(
        x.data_ptr(), mean.contiguous().data_ptr(), band.contiguous().data_ptr(), out.data_ptr(),
        keep.data_ptr() if keep is not None else None, *row_shape(x, channel_dim), int(relu), int(mask == "exact"),
        _threads(x))
    return out, keep


def _threads(x: torch.Tensor) -> int:
    """The calling thread's torch thread count, one thread per ``GRAIN`` values at most."""
    return max(1, min(torch.get_num_threads(), x.numel() // GRAIN))


def masked(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``torch.where(keep, grad, 0.0)`` in one pass where both share a dense layout on the CPU."""
    if not (grad.device.type == "cpu" and grad.dtype in _MASKED and grad.stride() == keep.stride()
            and (grad.is_contiguous() or grad.dim() == 4 and grad.is_contiguous(memory_format=torch.channels_last))
            and available()):
        return torch.where(keep, grad, 0.0)
    out = torch.empty_like(grad)
    getattr(_library, _MASKED[grad.dtype])(grad.data_ptr(), keep.data_ptr(), out.data_ptr(), grad.numel(),
                                           _threads(grad))
    return out
