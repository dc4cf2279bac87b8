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
from dataclasses import dataclass
from pathlib import Path

import torch

from .fusion import FUSED, compile_everything, row_shape
from .paths import cache_folder

SOURCE = Path(__file__).with_name("meansparse_kernels.c")
# -O3 vectorises the loops (-fno-trapping-math lets it vectorise the comparisons too); no
# -ffast-math, which would change how values round and compare.
OPTIMISE = ["-O3", "-fno-trapping-math", "-std=c11", "-fPIC"]
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
_failure: str | None = None  # why the kernel could not be built or loaded: PyTorch's operations run instead
_lock = threading.Lock()


@dataclass(frozen=True)
class Recipe:
    """One way to build the kernel: compiler flags, and what the link step adds (an OpenMP runtime)."""

    name: str
    flags: tuple[str, ...]
    link: tuple[str, ...] = ()


def _vector_flags(system: str, machine: str) -> list[str]:
    """Flags that let the compiler use this CPU's vector instructions."""
    if machine.lower() in ("x86_64", "amd64"):
        # 256-bit vectors: with 512-bit ones the kernel took about 15% longer inside a forward pass
        # on the development CPU (BENCHMARKS.md, B1).
        return ["-march=native", "-mprefer-vector-width=256"]
    if system == "Linux" and machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []  # Apple silicon: NEON is the baseline, and Apple clang's -mcpu=native depends on its version


def torch_openmp_runtime() -> Path | None:
    """The OpenMP runtime shipped inside PyTorch's wheel, if any (``torch/lib``)."""
    lib = Path(torch.__file__).parent / "lib"
    for pattern in ("libgomp*.so*", "libomp*.dylib", "libiomp5*", "libomp*.so*"):
        found = sorted(lib.glob(pattern))
        if found:
            return found[0]
    return None


def recipes(system: str | None = None, machine: str | None = None,
            runtime: Path | None | str = "torch") -> list[Recipe]:
    """Ways to build the kernel on this platform, best first; ``_build`` keeps the first that compiles.

    Parallel builds link the OpenMP runtime PyTorch itself loaded (``runtime``; "torch": look it up),
    so the kernel's threads are PyTorch's threads: a second runtime in the process would keep its own
    threads spinning beside PyTorch's (and on macOS two libomp copies abort the process). Apple clang
    has no ``-fopenmp``; it takes the pragmas through ``-Xpreprocessor``. Without a runtime to share
    on macOS, and wherever a parallel build fails, the kernel is built serial.
    """
    system = system or platform.system()
    machine = machine or platform.machine()
    runtime = torch_openmp_runtime() if runtime == "torch" else runtime
    vector = _vector_flags(system, machine)
    shared_runtime = (str(runtime), f"-Wl,-rpath,{Path(runtime).parent}") if runtime else ()
    found: list[Recipe] = []
    if system == "Darwin":
        if runtime:
            found.append(Recipe("OpenMP (PyTorch's runtime)", (*vector, "-Xpreprocessor", "-fopenmp"), shared_runtime))
    elif runtime:
        found.append(Recipe("OpenMP (PyTorch's runtime)", (*vector, "-fopenmp"), shared_runtime))
    else:  # PyTorch uses the system's runtime (a distribution's build): the compiler's own is that one
        found.append(Recipe("OpenMP", (*vector, "-fopenmp"), ("-fopenmp",)))
    found.append(Recipe("serial", tuple(vector)))
    if vector:
        found.append(Recipe("serial, portable", ()))
    return found


def _cpu_flags() -> str:
    """What -march=native compiles for: kernels built on another CPU must not be loaded here."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def library_path(cache: Path | None = None) -> Path:
    """Where the built kernel lives (default: the user's cache folder): keyed by the source, the
    recipes, the compiler and the CPU."""
    compiler = shutil.which(_compiler()) or _compiler()
    key = "\n".join([SOURCE.read_text(), repr(recipes()), compiler, platform.machine(), _cpu_flags()])
    return (cache or cache_folder("kernels")) / f"meansparse_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _compile(recipe: Recipe, scratch: Path, built: Path) -> None:
    """Compile, then link: the link step names the OpenMP runtime itself instead of the compiler's default."""
    obj = scratch / "kernel.o"
    subprocess.run([_compiler(), *OPTIMISE, *recipe.flags, "-c", str(SOURCE), "-o", str(obj)],
                   check=True, capture_output=True, text=True)
    subprocess.run([_compiler(), "-shared", str(obj), *recipe.link, "-o", str(built)],
                   check=True, capture_output=True, text=True)


def _build(path: Path) -> None:
    """Build the kernel at ``path`` with the first recipe that works; OSError if none does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        built = Path(scratch) / path.name
        for recipe in recipes():
            try:
                _compile(recipe, Path(scratch), built)
            except (OSError, subprocess.CalledProcessError) as exc:
                detail = (getattr(exc, "stderr", None) or str(exc)).strip()
                errors.append(detail.splitlines()[0] if detail else exc.__class__.__name__)
                continue
            os.replace(built, path)  # atomic: a concurrent process sees the whole file or none
            return
    raise OSError(errors[0])


def _open(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for name, arguments in _ARGUMENTS.items():
        getattr(library, name).argtypes = arguments
    library.meansparse_parallel.restype = ctypes.c_int
    return library


def _load() -> ctypes.CDLL | None:
    global _library, _failure
    with _lock:
        if _library is None and _failure is None:
            path = library_path()
            try:
                try:
                    library = _open(path) if path.exists() else None
                except (OSError, AttributeError):  # truncated, foreign or stale: build it again
                    path.unlink(missing_ok=True)
                    library = None
                if library is None:
                    _build(path)
                    library = _open(path)
                _library = library
            except (OSError, AttributeError) as exc:
                _failure = str(exc) or exc.__class__.__name__
                warnings.warn(f"MeanSparse uses PyTorch's operations: its C kernel could not be built or loaded "
                              f"({_failure}).", RuntimeWarning, stacklevel=3)
    return _library


def available() -> bool:
    """True when the kernel is switched on and built (building it on first use)."""
    return enabled and _load() is not None


def describe() -> str:
    """Which implementation runs the operator on this machine's CPU, in one sentence (``--version`` prints it)."""
    if not enabled:
        return "PyTorch's operations (the C kernel is switched off: MEANSPARSE_FUSED=0 or MEANSPARSE_COMPILE=1)"
    if _load() is None:
        return f"PyTorch's operations (the C kernel could not be built or loaded: {_failure})"
    threads = "parallel, on PyTorch's OpenMP threads" if _library.meansparse_parallel() else "serial"
    return f"C kernel, {threads} ({platform.system()} {platform.machine()}, {library_path()})"


def usable(x: torch.Tensor, channel_dim: int) -> bool:
    """True where the kernel runs ``x``: float32 or float64 on the CPU, in a layout ``as_rows`` can view."""
    return (x.is_cpu and x.dtype in _FUNCTIONS and not torch.compiler.is_compiling()
            and row_shape(x, channel_dim) is not None and available())


def _check_statistics(x: torch.Tensor, channels: int, **vectors: torch.Tensor) -> None:
    """The kernel reads ``channels`` values of ``x``'s dtype from each vector: anything else reads wrong memory."""
    for name, vector in vectors.items():
        if vector.dtype != x.dtype or vector.device.type != "cpu" or vector.numel() != channels:
            raise ValueError(f"{name} must be a CPU vector of {channels} {x.dtype} values like the features, "
                             f"got {vector.numel()} {vector.dtype} values on {vector.device}.")


def run(x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, channel_dim: int, relu: bool,
        mask: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The operator (then ReLU if ``relu``) on ``x``: (output, mask of passing gradients or None).

    ``x`` must be ``usable``; ``mean`` and ``band`` (alpha * std) are vectors of length C in its
    dtype, on the CPU (ValueError otherwise). ``mask`` is None, "exact" or "straight-through"; None
    is returned where every gradient passes. The output and the mask have ``x``'s memory layout;
    neither is a view.
    """
    rows = row_shape(x, channel_dim)
    if not (x.is_cpu and x.dtype in _FUNCTIONS and rows is not None and _library is not None):
        raise ValueError(f"The C kernel takes float32 or float64 CPU features in a dense layout once built, "
                         f"got {x.dtype} on {x.device}; check native.usable first.")
    _check_statistics(x, rows[1], mean=mean, band=band)
    if mask == "straight-through" and not relu:
        mask = None  # the operator alone passes every gradient: nothing to mask
    # Named, not temporaries: C reads these buffers, and a temporary's memory is freed (and can be
    # reused by the next allocation) as soon as data_ptr() returns.
    mean, band = mean.contiguous(), band.contiguous()
    # Dense layouts only (``usable``), which ``empty_like`` keeps: the output and the mask are laid out
    # as ``x`` is, so the three share one (A, C, B) shape and need no views.
    out = torch.empty_like(x)
    keep = torch.empty_like(x, dtype=torch.bool) if mask is not None else None
    getattr(_library, _FUNCTIONS[x.dtype])(
        x.data_ptr(), mean.data_ptr(), band.data_ptr(), out.data_ptr(),
        keep.data_ptr() if keep is not None else None, *rows, int(relu), int(mask == "exact"), _threads(x))
    return out, keep


def _threads(x: torch.Tensor) -> int:
    """The calling thread's torch thread count, one thread per ``GRAIN`` values at most."""
    return max(1, min(torch.get_num_threads(), x.numel() // GRAIN))


def masked(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``torch.where(keep, grad, 0.0)`` in one pass where both share a dense layout on the CPU."""
    if not (grad.device.type == "cpu" and grad.dtype in _MASKED and keep.device.type == "cpu"
            and keep.dtype == torch.bool and grad.shape == keep.shape and grad.stride() == keep.stride()
            and (grad.is_contiguous() or grad.dim() == 4 and grad.is_contiguous(memory_format=torch.channels_last))
            and available()):
        return torch.where(keep, grad, 0.0)
    out = torch.empty_like(grad)
    getattr(_library, _MASKED[grad.dtype])(grad.data_ptr(), keep.data_ptr(), out.data_ptr(), grad.numel(),
                                           _threads(grad))
    return out
