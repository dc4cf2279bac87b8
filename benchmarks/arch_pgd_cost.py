"""What one PGD-10 attack on one image against MeanSparse costs on this CPU, per demo architecture (random weights).

The app's live attack (``one_image.attack_image``, as B5 times it) at alpha 0.2, for every CIFAR-10
architecture in ``meansparse_core.architectures``; statistics from 64 random images. Interleaved
rounds; the median wall time, and the median CPU time of the process (on a shared machine the
CPU time moves less than the wall time: it leaves out the waits for other processes' turns).

    python benchmarks/arch_pgd_cost.py [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import statistics
import time

import torch

from common import arguments, save
from meansparse_core import attach, calibrate
from meansparse_core.architectures import ARCHITECTURES, build_architecture
from meansparse_core.attack_choice import AttackChoice
from meansparse_core.one_image import attack_image


def main() -> None:
    parser = arguments(__doc__, rounds=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    choice, image = AttackChoice(attack="pgd", eps=8, steps=10, target="sparse"), torch.rand(3, 32, 32)
    attacks = {}
    for name in (n for n in ARCHITECTURES if n.startswith("cifar")):
        model = build_architecture(name).eval()
        sparse = attach(model, calibrate(model, torch.rand(64, 3, 32, 32).split(32)))
        attacks[name] = (lambda sparse=sparse: attack_image(sparse, image, 0, choice, alpha=0.2))
        attacks[name]()  # warm-up
    wall: dict[str, list[float]] = {n: [] for n in attacks}
    cpu: dict[str, list[float]] = {n: [] for n in attacks}
    for _ in range(args.rounds):
        for name, run in attacks.items():
            started, used = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - used)
    results = {}
    for name in attacks:
        params = sum(p.numel() for p in build_architecture(name).parameters())
        results[name] = {"parameters": params, "fp16_megabytes": round(2 * params / 1e6, 1),
                         "wall_seconds": statistics.median(wall[name]), "cpu_seconds": statistics.median(cpu[name])}
        print(f"{name:20} {params / 1e6:5.2f}M parameters, fp16 {2 * params / 1e6:4.1f} MB: PGD-10 on one image "
              f"{results[name]['wall_seconds'] * 1000:5.0f} ms wall, {results[name]['cpu_seconds'] * 1000:5.0f} ms CPU "
              f"({args.threads} threads)")
    save(f"arch_pgd_cost_{args.threads}threads",
         {"rounds": args.rounds, "threads": args.threads, "architectures": results})


if __name__ == "__main__":
    main()
