"""B7: the CIFAR-10 demo model with channels-last weights (as shipped) over the same weights in NCHW.

Two costs, each with MeanSparse attached at ``--alpha``: a forward pass without gradients, and the
input-gradient pass an attack makes at every step (weights frozen). Same batch, same statistics;
the ratio is NCHW time over channels-last time (above 1: channels-last is faster).

    python benchmarks/b7_layout.py [--n 100] [--alpha 0.5] [--rounds 10] [--device cpu]
"""

from __future__ import annotations

import copy

import torch

from common import arguments, demo_cifar, images, interleaved, medians, ratio, save
from meansparse_core import attach
from meansparse_core.model_modes import frozen


def main() -> None:
    parser = arguments(__doc__, rounds=10)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args()
    shipped, stats = demo_cifar(args.device)
    layouts = {"channels_last": shipped, "nchw": copy.deepcopy(shipped).to(memory_format=torch.contiguous_format)}
    x = images(args.n, args.device)
    variants = {}
    for name, model in layouts.items():
        sparse = attach(model, stats).at(args.alpha)

        def forward(sparse=sparse):
            with torch.no_grad():
                sparse(x)

        def input_gradient(sparse=sparse, model=model):
            with frozen(model):
                probe = x.clone().requires_grad_(True)
                torch.autograd.grad(sparse(probe).sum(), probe)

        variants[f"forward_{name}"], variants[f"gradient_{name}"] = forward, input_gradient
    times = interleaved(variants, args.rounds)
    speedups = {cost: ratio(times, f"{cost}_nchw", f"{cost}_channels_last") for cost in ("forward", "gradient")}
    print(f"demo model, batch {args.n}, alpha {args.alpha:g}: channels-last is "
          f"x{speedups['forward']:.2f} as fast for a forward pass, x{speedups['gradient']:.2f} for an input gradient")
    save(f"b7_layout_{args.device}", {"n": args.n, "alpha": args.alpha, "rounds": args.rounds,
                                      "median_seconds": medians(times), "speedup": speedups})


if __name__ == "__main__":
    main()
