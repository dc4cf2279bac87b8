"""B1 before and after: the demo model's overhead with this checkout's library and with another commit's.

Each round starts one new process per library (alternating), so the two never share an allocator or
a thread pool. In each process the base model (loaded on its own, nothing attached) and the
sparsified model at ``--alpha`` run in interleaved blocks of ``--forwards`` passes (batch 32);
the overhead is the median over blocks of sparsified/base, in wall time and in processor time
(user + system of the whole process), with the minor page faults per pass. Processor time counts what the process computed, not how
long it waited for a core, so it is the figure to compare on a machine busy with other work;
with one thread (``--threads 1``) it has no idle-spinning worker threads in it either.

    python benchmarks/b1_before_after.py --against <commit> [--threads 1] [--rounds 3] [--forwards 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(threads: int, blocks: int, forwards: int, alpha: float) -> dict:
    """Runs in a process whose sys.path starts with the library under test."""
    import torch

    from meansparse_core import attach
    from meansparse_core.models import bundled_statistics_path, find_model, load_model
    from meansparse_core.statistics import Statistics

    torch.set_num_threads(threads)
    spec = find_model("bundled/cifar-resnet9")
    base, model = load_model(spec), load_model(spec)
    sparse = attach(model, Statistics.load(bundled_statistics_path(spec)))
    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    variants = {"base": lambda: base(x), "meansparse": lambda: sparse(x, alpha)}
    times = {name: {"wall": [], "processor": [], "page_faults": []} for name in variants}
    with torch.no_grad():
        for run in variants.values():
            run()
        for block in range(blocks):
            for name in (list(variants) if block % 2 else list(variants)[::-1]):
                wall, processor = time.perf_counter(), time.process_time()
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for _ in range(forwards):
                    variants[name]()
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["processor"].append(time.process_time() - processor)
                times[name]["page_faults"].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / forwards)
    return {clock: statistics.median(s / b for s, b in zip(times["meansparse"][clock], times["base"][clock])) - 1
            for clock in ("wall", "processor")} | {
        "base_ms": statistics.median(times["base"]["wall"]) / forwards * 1e3,
        "page_faults_per_forward": {name: statistics.median(t["page_faults"]) for name, t in times.items()}}


def extract(commit: str, folder: Path) -> Path:
    """``commit``'s meansparse_core (with its C kernel source) into ``folder``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "meansparse_core"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def measure(library: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(library), "MEANSPARSE_ASSETS": str(ROOT / "meansparse_core" / "assets")}
    code = (f"import sys, json; sys.path.insert(0, {str(library)!r}); sys.path.insert(1, {str(ROOT / 'benchmarks')!r});"
            f"from b1_before_after import child; print(json.dumps(child({args.threads}, {args.blocks}, "
            f"{args.forwards}, {args.alpha})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the commit to compare with (e.g. main)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--forwards", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.25)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import save

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.against], check=True,
                            capture_output=True, text=True).stdout.strip()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        libraries = {f"before ({commit})": extract(args.against, Path(folder)), "after (this checkout)": ROOT}
        runs = {name: [] for name in libraries}
        for _ in range(args.rounds):
            for name, library in libraries.items():
                runs[name].append(measure(library, args))
    load_after = os.getloadavg()
    print(f"demo model, batch 32, alpha {args.alpha}, {args.threads} thread(s); load average {load_before[0]:.1f} "
          f"before, {load_after[0]:.1f} after")
    for name, results in runs.items():
        wall = statistics.median(r["wall"] for r in results)
        processor = statistics.median(r["processor"] for r in results)
        base = statistics.median(r["base_ms"] for r in results)
        faults = [round(r["page_faults_per_forward"][v]) for r in results for v in ("base", "meansparse")]
        print(f"{name:24} overhead: wall {wall:+.1%}, processor {processor:+.1%} (base forward {base:.1f} ms; "
              f"per round: {', '.join(format(r['processor'], '+.1%') for r in results)}; minor page faults per "
              f"forward, base and MeanSparse by round: {faults})")
    save(f"b1_before_after_{args.threads}_threads", {"against": commit, "threads": args.threads, "runs": runs,
                                                     "load_average": [load_before, load_after]})


if __name__ == "__main__":
    main()
