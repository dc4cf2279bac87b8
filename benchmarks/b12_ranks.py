"""B12: two torchrun ranks with one thread each against one process with two threads, same evaluation.

Both run the same ``evaluate`` command line (PGD on the sparsified model, no cache) in interleaved
rounds: ``OMP_NUM_THREADS=2 python -m meansparse_core evaluate ...`` and ``torchrun --standalone
--nproc-per-node 2 -m meansparse_core -- evaluate ...`` (torchrun gives each rank one thread).
Reported: the evaluation's own seconds (the JSON's ``seconds``: predictions, attacks and the
gather, without process start-up and model loading), the whole command's wall time, the
throughput ratio (one process's time over the ranks' time, median of per-round ratios), and
whether both gave the same accuracies and the same per-item file.

Runs on CIFAR-10 test images when ``--data-dir`` holds them, on the offline digits otherwise.

    python benchmarks/b12_ranks.py [--n 200] [--rounds 3] [--data-dir data/cifar10-jpeg]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, save


def command(args, ranks: bool, items: Path) -> list[str]:
    model = ["--model", "bundled/cifar-resnet9", "--data-dir", args.data_dir] if args.data_dir else \
        ["--model", "bundled/digits-cnn"]
    evaluate = ["evaluate", *model, "--attack", "pgd", "--eps", str(args.eps), "--steps", "10", "--alpha",
                str(args.alpha), "--n-items", str(args.n), "--no-cache", "--json", "--items", str(items),
                "--device", "cpu"]
    if ranks:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "meansparse_core", "--", *evaluate]
    return [sys.executable, "-m", "meansparse_core", *evaluate]


def run(args, ranks: bool, folder: Path, round_: int) -> dict:
    items = folder / f"{'ranks' if ranks else 'single'}-{round_}.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1" if ranks else "2"}
    start = time.perf_counter()
    done = subprocess.run(command(args, ranks, items), cwd=folder, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    record = json.loads(done.stdout)
    return {"seconds": record["seconds"], "wall": wall, "clean": record["clean_acc"], "robust": record["robust_acc"],
            "items": items.read_text(), "world_size": record["world_size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder; without it, the digits model")
    parser.add_argument("--eps", type=float, default=None, help="/255 (default 8 on CIFAR-10, 32 on digits)")
    parser.add_argument("--alpha", type=float, default=0.25)
    args = parser.parse_args()
    args.eps = args.eps if args.eps is not None else (8 if args.data_dir else 32)
    runs: dict[str, list[dict]] = {"single, 2 threads": [], "2 ranks, 1 thread each": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = [False, True] if round_ % 2 == 0 else [True, False]  # alternate who goes first
            for ranks in order:
                runs["2 ranks, 1 thread each" if ranks else "single, 2 threads"].append(run(args, ranks, Path(tmp), round_))
    single, ranks = runs["single, 2 threads"], runs["2 ranks, 1 thread each"]
    same = all((s["clean"], s["robust"], s["items"]) == (r["clean"], r["robust"], r["items"])
               for s, r in zip(single, ranks))
    ratio = statistics.median(s["seconds"] / r["seconds"] for s, r in zip(single, ranks))
    wall_ratio = statistics.median(s["wall"] / r["wall"] for s, r in zip(single, ranks))
    print(f"{'variant':<24} {'evaluation s':>13} {'command s':>10}  accuracies")
    for name, rows in runs.items():
        print(f"{name:<24} {statistics.median(r['seconds'] for r in rows):>13.2f} "
              f"{statistics.median(r['wall'] for r in rows):>10.2f}  clean {rows[0]['clean']:.2%} robust {rows[0]['robust']:.2%}")
    print(f"throughput, 2 ranks over 1 process: x{ratio:.2f} (evaluation), x{wall_ratio:.2f} (whole command); "
          f"same accuracies and per-item files in every round: {same}")
    load = os.getloadavg()
    print(f"load average during the run (1, 5, 15 min): {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}")
    save("b12_ranks", {"args": vars(args), "ratio": ratio, "wall_ratio": wall_ratio,
                       "same": same, "load": load,
                       "runs": {k: [{x: v for x, v in r.items() if x != "items"} for r in rows]
                                for k, rows in runs.items()}})


if __name__ == "__main__":
    main()
