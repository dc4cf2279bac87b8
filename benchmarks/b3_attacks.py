"""B3: PGD-10 against the sparsified model over PGD-10 against the base model, on the same items.

Exact gradients and straight-through (BPDA) gradients through MeanSparse are both timed, each
interleaved with the base attack, eager and compiled whole (``torch.compile``, compiled in the
warm-up round); same images, labels, seed and step size. Ratios are against the eager base and
against the faster base (the best base a user could attack).

    python benchmarks/b3_attacks.py [--n 200] [--rounds 3] [--alpha 0.25] [--device cpu]
"""

from __future__ import annotations


import torch

from common import MODELS, arguments, images, interleaved, medians, ratio, save
from meansparse_core import attach
from meansparse_core.attacks import make_attack


def main() -> None:
    parser = arguments(__doc__, rounds=3, pick_model=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--alpha", type=float, default=0.25)
    args = parser.parse_args()
    model, stats = MODELS[args.model](args.device)
    sparse = attach(model, stats)
    x = images(args.n, args.device)
    labels = torch.arange(args.n, device=args.device) % 10

    def pgd(target):
        return lambda: make_attack("pgd", target, eps=8, steps=10, seed=0)(x, labels)

    times = interleaved({"base": pgd(model), "compiled_base": pgd(torch.compile(model)),
                         "meansparse_exact": pgd(sparse.at(args.alpha)),
                         "meansparse_bpda": pgd(sparse.at(args.alpha, "straight-through"))}, args.rounds)
    median = medians(times)
    best = min(("base", "compiled_base"), key=median.get)
    ratios = {k: ratio(times, k, "base") for k in ("compiled_base", "meansparse_exact", "meansparse_bpda")}
    best_ratios = {k: ratio(times, k, best) for k in ("meansparse_exact", "meansparse_bpda")}
    print(f"{args.model}, PGD-10 on {args.n} images: base {median['base']:.2f} s, compiled base "
          f"x{ratios['compiled_base']:.3f}; MeanSparse exact x{ratios['meansparse_exact']:.3f}, BPDA "
          f"x{ratios['meansparse_bpda']:.3f}; against the faster base ({best}): exact x{best_ratios['meansparse_exact']:.3f}, "
          f"BPDA x{best_ratios['meansparse_bpda']:.3f} (goal <= 1.05)")
    save(f"b3_attacks_{args.device}", {"model": args.model, "n": args.n, "alpha": args.alpha, "rounds": args.rounds,
                                       "median_seconds": median, "ratios": ratios, "best_base": best,
                                       "ratios_vs_best_base": best_ratios})


if __name__ == "__main__":
    main()
