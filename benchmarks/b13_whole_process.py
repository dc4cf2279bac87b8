"""B13: what a user waits for: whole `evaluate` processes with MeanSparse over without, and a sweep.

Each variant is a new process (`python -m meansparse_core evaluate ... --no-cache --json`, the CIFAR-10
demo model, PGD-10 at eps 8/255), so imports, loading, kernel building or compiling and the
evaluation are all counted. Variants run in alternating rounds (shuffled order each round); the
ratio is the median of the per-round ratios to `--alpha 0`:

- `alpha 0.25`: the library as it runs by default;
- `alpha 0.25, MEANSPARSE_FUSED=0`: PyTorch's own operations, no kernel;
- `alpha 0.25, MEANSPARSE_COMPILE=1`: the operator compiled with torch.compile in every process
  (Inductor's on-disk caches warm), as the library ran before the C kernel.

Then the first process on a machine (an empty kernel cache: a fresh working folder) against a
second one, and `sweep --alphas` over 5 alphas in one process against the 5 single `evaluate`
processes it replaces (one round each).

    python benchmarks/b13_whole_process.py --data-dir /tmp/cifar10-jpeg [--n 300] [--rounds 3]
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, arguments, save

ALPHAS = (0.1, 0.2, 0.25, 0.3, 0.4)


def command(args, verb: str, alphas: str) -> list[str]:
    return [sys.executable, "-m", "meansparse_core", verb, "--model", "bundled/cifar-resnet9", "--data-dir",
            str(Path(args.data_dir).resolve()), "--eps", "8", "--attack", "pgd", "--steps", "10", "--n", str(args.n),
            "--no-cache", "--json", "--alphas" if verb == "sweep" else "--alpha", alphas]


CPU_SECONDS: list[float] = []  # processor seconds (user + system) of every timed process, in order


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> tuple[float, list[dict]]:
    """Wall seconds of one process, and its JSON records; its processor seconds go to ``CPU_SECONDS``.

    Processor time counts what the process computed, not how long it waited for a core, so it
    moves less than wall time when other work shares the machine.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    records = json.loads(done.stdout)
    return seconds, records if isinstance(records, list) else [records]


def load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def pairs(args) -> dict:
    variants = {"alpha 0": (command(args, "evaluate", "0"), {}),
                "alpha 0.25": (command(args, "evaluate", "0.25"), {}),
                "alpha 0.25, MEANSPARSE_FUSED=0": (command(args, "evaluate", "0.25"), {"MEANSPARSE_FUSED": "0"}),
                "alpha 0.25, MEANSPARSE_COMPILE=1": (command(args, "evaluate", "0.25"), {"MEANSPARSE_COMPILE": "1"})}
    for name in ("alpha 0.25", "alpha 0.25, MEANSPARSE_COMPILE=1"):  # warm-up: kernel built, Inductor's caches filled
        timed(*variants[name])
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    accuracies: dict[str, set] = {name: set() for name in variants}
    order, shuffler = list(variants), random.Random(0)
    for _ in range(args.rounds):
        shuffler.shuffle(order)
        for name in order:
            seconds, (record,) = timed(*variants[name])
            times[name].append(seconds)
            cpu[name].append(CPU_SECONDS[-1])
            accuracies[name].add((record["clean_acc"], record["robust_acc"]))

    def ratios(of: dict[str, list[float]]) -> dict[str, float]:
        return {name: statistics.median(a / b for a, b in zip(of[name], of["alpha 0"])) for name in of if name != "alpha 0"}

    return {"seconds": times, "cpu_seconds": cpu, "ratios": ratios(times), "cpu_ratios": ratios(cpu),
            "accuracies": {k: sorted(v) for k, v in accuracies.items()}}


def first_and_second(args) -> dict:
    """A process on a machine that has never built the kernel, then the next one (same fresh folder)."""
    with tempfile.TemporaryDirectory() as fresh:
        cmd = command(args, "evaluate", "0.25")
        first, _ = timed(cmd, cwd=Path(fresh))
        second, _ = timed(cmd, cwd=Path(fresh))
    return {"first": first, "second": second, "first_cpu": CPU_SECONDS[-2], "second_cpu": CPU_SECONDS[-1]}


def sweep_against_singles(args) -> dict:
    alphas = ",".join(map(str, ALPHAS))
    sweep_seconds, sweep_records = timed(command(args, "sweep", alphas))
    sweep_cpu = CPU_SECONDS[-1]
    singles = [timed(command(args, "evaluate", str(a))) for a in ALPHAS]
    single_records = [r for _, (r,) in singles]
    same = [(r["clean_acc"], r["robust_acc"]) for r in sweep_records] == [
        (r["clean_acc"], r["robust_acc"]) for r in single_records]
    return {"sweep": sweep_seconds, "singles": sum(s for s, _ in singles), "same_results": same,
            "sweep_cpu": sweep_cpu, "singles_cpu": sum(CPU_SECONDS[-len(ALPHAS):])}


def main() -> None:
    parser = arguments(__doc__, rounds=3)
    parser.add_argument("--data-dir", required=True, help="the cifar10-jpeg folder")
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    results = {"n": args.n, "rounds": args.rounds, "load_before": load()}
    results["pairs"] = pairs(args)
    p = results["pairs"]
    print(f"whole `evaluate` process, n={args.n}, PGD-10, median of {args.rounds} alternating rounds "
          f"(load average before: {results['load_before']}):")
    print(f"  {'':34} {'wall':>9} {'ratio':>9} {'processor':>11} {'ratio':>9}")
    for name, seconds in p["seconds"].items():
        ratio = f"x{p['ratios'][name]:.3f}" if name in p["ratios"] else "reference"
        cpu_ratio = f"x{p['cpu_ratios'][name]:.3f}" if name in p["cpu_ratios"] else "reference"
        print(f"  {name:34} {statistics.median(seconds):7.2f} s {ratio:>9} {statistics.median(p['cpu_seconds'][name]):9.2f} s "
              f"{cpu_ratio:>9}  accuracies {p['accuracies'][name]}")
    results["first_second"] = first_and_second(args)
    fs = results["first_second"]
    print(f"first process on a fresh machine {fs['first']:.2f} s ({fs['first_cpu']:.2f} processor s), second "
          f"{fs['second']:.2f} s ({fs['second_cpu']:.2f}) (alpha 0.25)")
    results["sweep"] = sweep_against_singles(args)
    sw = results["sweep"]
    print(f"sweep of {len(ALPHAS)} alphas {sw['sweep']:.2f} s, {len(ALPHAS)} single evaluations {sw['singles']:.2f} s: "
          f"x{sw['sweep'] / sw['singles']:.3f} (processor x{sw['sweep_cpu'] / sw['singles_cpu']:.3f}); "
          f"same results: {sw['same_results']}")
    results["load_after"] = load()
    print(f"load average after: {results['load_after']}")
    save(f"b13_whole_process_{args.device}", results)


if __name__ == "__main__":
    main()
