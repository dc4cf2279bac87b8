"""B6 on a GPU: MeanSparse against the base model in one run, eager and compiled, and compiled-vs-eager agreement.

Rows (``what``): ``forward`` (batches 32 and 512), ``pgd10-exact`` and ``pgd10-bpda`` (PGD-10, eps 8/255,
one batch of 512), ``autoattack-1000`` (AutoAttack standard on 1,000 CIFAR-10 test images, demo model
only). Each row times the base and the sparsified model side by side in interleaved rounds and gives
the ratio sparse/base (median of per-round ratios); ``mode`` says whether both ran eagerly or both
compiled whole (the base with ``torch.compile``, the sparsified model exported with the placement
traced, ``meansparse::sparsify`` decomposed for Inductor, then compiled with ``fullgraph=True``).
Models: ``bundled/cifar-resnet9-w64`` with its statistics and a WRN-28-10 with random weights.

Agreement (``agreement``): compiled against eager at ``--alpha`` on the demo model: predictions on
the CIFAR-10 test images (all 10,000 on the GPU), the largest and median logit differences for the
sparsified and for the base model (equal sizes point at Inductor's own kernels, not the operator),
and robust accuracy under PGD-20 with exact and BPDA gradients on 1,000 images.

Compile times (``compile_seconds``): the demo model's first compiled call in a new process, with an
empty and then with a warm Inductor cache (two processes, one after the other).

The JSON at ``--out`` is written after every row, and rows already in it are skipped, so running
the same command again resumes; ``--deadline`` (seconds) stops starting rows that would not fit.

    python benchmarks/gpu/b6.py --archive carry/cifar10-jpeg.tar.gz --deadline 540   # on the GPU
    python benchmarks/gpu/b6.py --tiny --out /tmp/b6-tiny.json                       # CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common import interleaved, ratio, wrn_28_10  # noqa: E402
from meansparse_core import attach  # noqa: E402
from meansparse_core.attacks import make_attack  # noqa: E402
from meansparse_core.compiled import CompiledModel  # noqa: E402
from meansparse_core.models import bundled_statistics_path, find_model, load_model  # noqa: E402
from meansparse_core.operator import register_inductor_decompositions  # noqa: E402
from meansparse_core.statistics import Statistics  # noqa: E402

DEMO = "bundled/cifar-resnet9-w64"


@dataclass(frozen=True)
class Scale:
    device: str
    forward_batches: tuple[int, ...]
    attack_batch: int
    autoattack_n: int
    agreement_n: int | None  # None: the whole test split
    robust_n: int
    rounds: int
    backend: str  # torch.compile's; the CPU rehearsal uses aot_eager to stay short


GPU = Scale("cuda", (32, 512), 512, 1000, None, 1000, 10, "inductor")
TINY = Scale("cpu", (2,), 2, 4, 8, 4, 1, "aot_eager")


def demo(device: str) -> tuple[nn.Module, Statistics]:
    spec = find_model(DEMO)
    return load_model(spec).to(device).eval(), Statistics.load(bundled_statistics_path(spec))


MODELS: dict[str, Callable[[str], tuple[nn.Module, Statistics]]] = {
    "cifar-resnet9-w64": demo, "WRN-28-10 (random weights)": wrn_28_10}


def compiled_attackable(sparse, alpha: float, grad: str, example: torch.Tensor, backend: str) -> nn.Module:
    """``sparse.at(alpha, grad)`` exported with gradients kept (a mask per tap), then compiled whole."""
    fixed = sparse.at(alpha, grad)
    with torch.enable_grad():
        program = torch.export.export(fixed, (example.clone().requires_grad_(True),), strict=False,
                                      dynamic_shapes=({0: torch.export.Dim.AUTO},))
    return torch.compile(program.module(), fullgraph=True, backend=backend)


def cifar_test(archive: Path | None, state: Path, n: int | None, device: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """CIFAR-10 test images and labels from the carried archive, else random ones (timing still holds)."""
    if archive is not None and archive.exists():
        from session import cifar_batches_from_archive

        from meansparse_core.data import load_dataset, load_items

        dataset = load_dataset("cifar10", "test", root=cifar_batches_from_archive(archive, state / "cifar10"), fetch=False)
        images, labels = load_items(dataset, range(min(n or len(dataset), len(dataset))))
        return images.to(device), labels.to(device), "cifar10-test"
    generator = torch.Generator().manual_seed(0)
    n = n or 10000
    return torch.rand(n, 3, 32, 32, generator=generator).to(device), torch.randint(0, 10, (n,), generator=generator).to(device), "random"


class Run:
    """The results file: rows done so far, written after each; the deadline."""

    def __init__(self, out: Path, deadline: float, info: dict) -> None:
        self.out, self.start, self.deadline = out, time.perf_counter(), deadline
        self.results = json.loads(out.read_text()) if out.exists() else {**info, "rows": [], "agreement": {},
                                                                           "compile_seconds": {}}

    def left(self) -> float:
        return self.deadline - (time.perf_counter() - self.start)

    def has(self, **key) -> bool:
        return any(all(row.get(k) == v for k, v in key.items()) for row in self.results["rows"])

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2) + "\n")

    def row(self, model: str, batch: int, what: str, mode: str, base: Callable, sparse: Callable, rounds: int,
            needs: float = 30) -> None:
        key = {"model": model, "batch": batch, "what": what, "mode": mode}
        if self.has(**key) or self.left() < needs:
            return
        times = interleaved({"base": base, "sparse": sparse}, rounds)
        self.results["rows"].append({**key, "base_s": statistics.median(times["base"]),
                                     "sparse_s": statistics.median(times["sparse"]),
                                     "ratio": ratio(times, "sparse", "base")})
        self.save()
        print(json.dumps(self.results["rows"][-1]), flush=True)


def timing_rows(run: Run, scale: Scale, alpha: float) -> None:
    for name, build in MODELS.items():
        model, stats = build(scale.device)
        sparse = attach(model, stats)
        compiled_base = torch.compile(model, backend=scale.backend)
        compiled_sparse = CompiledModel(sparse, backend=scale.backend)
        for batch in scale.forward_batches:
            x = torch.rand(batch, 3, 32, 32, device=scale.device)
            with torch.no_grad():
                run.row(name, batch, "forward", "eager", lambda: model(x), lambda: sparse(x, alpha), scale.rounds)
                run.row(name, batch, "forward", "compiled", lambda: compiled_base(x), lambda: compiled_sparse(x, alpha),
                        scale.rounds, needs=90)
        x = torch.rand(scale.attack_batch, 3, 32, 32, device=scale.device)
        labels = torch.arange(scale.attack_batch, device=scale.device) % 10
        for grad, what in (("exact", "pgd10-exact"), ("straight-through", "pgd10-bpda")):
            def pgd(target: nn.Module) -> Callable:
                return lambda: make_attack("pgd", target, eps=8, steps=10)(x, labels)
            run.row(name, scale.attack_batch, what, "eager", pgd(model), pgd(sparse.at(alpha, grad)), scale.rounds)
            if not run.has(model=name, batch=scale.attack_batch, what=what, mode="compiled") and run.left() > 120:
                attackable = compiled_attackable(sparse, alpha, grad, x, scale.backend)
                run.row(name, scale.attack_batch, what, "compiled", pgd(compiled_base), pgd(attackable), scale.rounds)
        sparse.detach()


def autoattack_rows(run: Run, scale: Scale, alpha: float, images: torch.Tensor, labels: torch.Tensor) -> None:
    """AutoAttack once per model (minutes each on the GPU): one round, base then sparsified."""
    model, stats = demo(scale.device)
    sparse = attach(model, stats)
    x, y = images[:scale.autoattack_n], labels[:scale.autoattack_n]
    run.row("cifar-resnet9-w64", len(x), "autoattack-1000", "eager",
            lambda: make_attack("autoattack", model, eps=8)(x, y),
            lambda: make_attack("autoattack", sparse.at(alpha), eps=8)(x, y), rounds=1, needs=360)
    sparse.detach()


def agreement(run: Run, scale: Scale, alpha: float, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Compiled against eager on the demo model: predictions, logit differences, PGD-20 robust accuracy."""
    if run.results["agreement"] or run.left() < 150:
        return
    model, stats = demo(scale.device)
    sparse = attach(model, stats)
    compiled_sparse, compiled_base = CompiledModel(sparse, backend=scale.backend), torch.compile(model, backend=scale.backend)
    batches = list(zip(images.split(500), labels.split(500)))
    with torch.no_grad():
        pairs = [(sparse(x, alpha), compiled_sparse(x, alpha), model(x), compiled_base(x)) for x, _ in batches]
    eager, compiled, base, base_compiled = (torch.cat(t) for t in zip(*pairs))
    differences = (compiled - eager).abs().flatten()
    result = {"alpha": alpha, "n": len(images),
              "predictions_differing": int((compiled.argmax(1) != eager.argmax(1)).sum()),
              "logit_difference_max": differences.max().item(), "logit_difference_median": differences.median().item(),
              "base_logit_difference_max": (base_compiled - base).abs().max().item(),
              "tf32_convolutions": torch.backends.cudnn.allow_tf32}
    x, y = images[:scale.robust_n], labels[:scale.robust_n]
    for grad in ("exact", "straight-through"):
        attackable = compiled_attackable(sparse, alpha, grad, x[:2], scale.backend)
        accuracy = {}
        for mode, target in (("eager", sparse.at(alpha, grad)), ("compiled", attackable)):
            adversarial = torch.cat([make_attack("pgd", target, eps=8, steps=20)(a, b)
                                     for a, b in zip(x.split(500), y.split(500))])
            with torch.no_grad():
                accuracy[mode] = 100 * (sparse(adversarial, alpha).argmax(1) == y).float().mean().item()
        result[f"pgd20_{grad}_robust_accuracy"] = accuracy
        result[f"pgd20_{grad}_within_0.2_points"] = abs(accuracy["eager"] - accuracy["compiled"]) <= 0.2
    sparse.detach()
    run.results["agreement"] = result
    run.save()
    print(json.dumps({"agreement": result}), flush=True)


def compile_probe(device: str, backend: str) -> float:
    """Seconds of the demo model's first compiled call in this (new) process, minus a steady call."""
    model, stats = demo(device)
    x = torch.rand(32, 3, 32, 32, device=device)
    compiled = CompiledModel(attach(model, stats), backend=backend)
    start = time.perf_counter()
    compiled(x, 0.25)
    first = time.perf_counter() - start
    start = time.perf_counter()
    compiled(x, 0.3)
    return first - (time.perf_counter() - start)


def compile_times(run: Run, scale: Scale, cache: Path) -> None:
    """The first compile in a new process with an empty Inductor cache, then with the warm one."""
    if run.results["compile_seconds"] or run.left() < 240:
        return
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    code = (f"import sys; sys.argv = ['b6']; sys.path.insert(0, {str(Path(__file__).parent)!r}); import b6; "
            f"print(b6.compile_probe({scale.device!r}, {scale.backend!r}))")
    for process in ("first_process", "second_process"):
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
        run.results["compile_seconds"][process] = float(out.stdout.strip().splitlines()[-1])
    run.save()
    print(json.dumps({"compile_seconds": run.results["compile_seconds"]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal at toy scale (aot_eager backend)")
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--archive", type=Path, default=None, help="CIFAR-10 JPEG archive (random images without it)")
    parser.add_argument("--state", type=Path, default=ROOT / "carry" / "b6-state", help="decoded data, Inductor cache")
    parser.add_argument("--deadline", type=float, default=540, help="seconds; rows that would not fit are left")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/gpu-results/b6-<date>.json)")
    args = parser.parse_args()
    scale = TINY if args.tiny else GPU
    if scale.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --tiny for the CPU rehearsal")
    out = args.out or ROOT / "benchmarks" / "gpu-results" / f"b6-{time.strftime('%Y-%m-%d')}.json"
    device = torch.cuda.get_device_name() if scale.device == "cuda" else "cpu (rehearsal)"
    run = Run(out, args.deadline, {"device": device, "torch": torch.__version__, "alpha": args.alpha})
    register_inductor_decompositions()
    images, labels, data = cifar_test(args.archive, args.state, scale.agreement_n, scale.device)
    run.results["data"] = data
    timing_rows(run, scale, args.alpha)
    agreement(run, scale, args.alpha, images, labels)
    compile_times(run, scale, args.state / "inductor")
    autoattack_rows(run, scale, args.alpha, images, labels)
    run.results["unfinished"] = unfinished(run, scale)
    run.save()
    print(f"wrote {out}; {len(run.results['rows'])} rows; unfinished: {run.results['unfinished']}")


def unfinished(run: Run, scale: Scale) -> list[str]:
    """The rows and checks a complete run has and this file lacks (what running the command again does)."""
    expected = [(m, b, "forward", mode) for m in MODELS for b in scale.forward_batches for mode in ("eager", "compiled")]
    expected += [(m, scale.attack_batch, what, mode) for m in MODELS for what in ("pgd10-exact", "pgd10-bpda")
                 for mode in ("eager", "compiled")]
    expected.append(("cifar-resnet9-w64", scale.autoattack_n, "autoattack-1000", "eager"))
    missing = [" ".join(map(str, key)) for key in expected
               if not run.has(model=key[0], batch=key[1], what=key[2], mode=key[3])]
    return missing + [name for name in ("agreement", "compile_seconds") if not run.results[name]]


if __name__ == "__main__":
    main()
