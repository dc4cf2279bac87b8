"""B1c: does the C kernel's threading cost anything beside PyTorch's? Three builds of it, side by side in one process.

- ``torch runtime``: the library's build, parallel on the OpenMP runtime PyTorch itself loaded;
- ``second runtime``: the same code linked to another copy of libgomp (one with its own name, as
  scikit-learn's wheel ships it), so two OpenMP thread pools live in the process, as happens when a
  kernel links the system's runtime and PyTorch bundles a renamed one;
- ``serial``: built without OpenMP, one thread per call.

Each is timed in the sparsified demo model's forward pass (its ReLUs fused with the operator) and
on the operator alone, interleaved with the base model's forward pass; figures are ratios to the
base (median of per-round ratios) and each build's time relative to the library's build.

    python benchmarks/b1_openmp_runtimes.py [--batch 32] [--rounds 15] [--alpha 0.25]
"""

from __future__ import annotations

import site
import tempfile
from pathlib import Path

import torch

from common import arguments, demo_cifar, images, interleaved, medians, ratio, save
from meansparse_core import attach, native


def second_runtime() -> Path | None:
    """An OpenMP runtime with another name than PyTorch's, from the installed wheels (None if there is none)."""
    torch_name = native.torch_openmp_runtime().name if native.torch_openmp_runtime() else "libgomp.so.1"
    for folder in site.getsitepackages():
        for found in sorted(Path(folder).glob("*/libgomp-*.so*")):
            if found.name != torch_name:
                return found
    return None


def builds(scratch: Path) -> dict[str, object]:
    """The kernel built three ways, each loaded (ctypes) from its own file."""
    recipes = {r.name: r for r in native.recipes()}
    parallel = recipes.get("OpenMP (PyTorch's runtime)") or recipes["OpenMP"]
    chosen = {"torch runtime": parallel, "serial": recipes["serial"]}
    other = second_runtime()
    if other is not None:
        chosen["second runtime"] = native.Recipe("second runtime", parallel.flags,
                                                 (str(other), f"-Wl,-rpath,{other.parent}"))
    loaded = {}
    for name, recipe in chosen.items():
        folder = scratch / name.replace(" ", "_")
        folder.mkdir()
        path = folder / "kernel.so"
        native._compile(recipe, folder, path)
        loaded[name] = native._open(path)
    return loaded


def openmp_libraries() -> list[str]:
    return sorted({line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                   if "omp" in line.rsplit("/", 1)[-1]})


def main() -> None:
    parser = arguments(__doc__, rounds=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=0.25)
    args = parser.parse_args()
    model, stats = demo_cifar()
    sparse = attach(model, stats)
    x = images(args.batch)
    features = torch.randn(args.batch, 64, 32, 32, generator=torch.Generator().manual_seed(0))
    mean, band = torch.zeros(64), torch.full((64,), 0.25)
    assert native.available(), "this benchmark compares builds of the C kernel"
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        libraries = builds(Path(scratch))
        expected = sparse(x, alpha=args.alpha)

        def with_library(name, run):
            def timed():
                native._library = libraries[name]
                return run()
            return timed

        variants = {"base": lambda: model(x)}
        for name in libraries:
            native._library = libraries[name]
            assert torch.equal(sparse(x, alpha=args.alpha), expected), f"{name} computes the same logits"
            variants[f"forward, {name}"] = with_library(name, lambda: sparse(x, alpha=args.alpha))
            variants[f"operator, {name}"] = with_library(name, lambda: native.run(features, mean, band, 1, True, None))
        runtimes = openmp_libraries()
        times = interleaved(variants, args.rounds)
    results = {"batch": args.batch, "alpha": args.alpha, "rounds": args.rounds, "threads": torch.get_num_threads(),
               "openmp_libraries_loaded": runtimes, "median_seconds": medians(times),
               "forward_vs_base": {n: ratio(times, f"forward, {n}", "base") for n in libraries},
               "forward_vs_torch_runtime": {n: ratio(times, f"forward, {n}", "forward, torch runtime") for n in libraries},
               "operator_vs_torch_runtime": {n: ratio(times, f"operator, {n}", "operator, torch runtime")
                                             for n in libraries}}
    print(f"OpenMP libraries in the process: {runtimes}; torch threads: {torch.get_num_threads()}")
    print(f"{'build':16} {'forward / base':>15} {'forward / torch runtime':>24} {'operator / torch runtime':>25}")
    for name in libraries:
        print(f"{name:16} {results['forward_vs_base'][name]:15.3f} {results['forward_vs_torch_runtime'][name]:24.3f} "
              f"{results['operator_vs_torch_runtime'][name]:25.3f}")
    save("b1_openmp_runtimes", results)


if __name__ == "__main__":
    main()
