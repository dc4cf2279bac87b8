"""B1: forward-pass overhead of MeanSparse, ours against a baseline written from the paper, side by side.

For each model, on the same batch: the base forward, eager and compiled whole (``torch.compile``);
the forward with MeanSparse at ``--alpha`` as the library runs it (on CPUs the C kernel, fused with
the ReLU after it); the same with fusion off (PyTorch's operations); the sparsified model compiled
whole (``compiled.CompiledModel``, alpha a tensor input); and the sparsified forward with every
operator swapped for a straightforward baseline built from the paper's description (``x - mean``,
``abs``, compare with ``alpha * std``, then ``torch.where`` against a full-size tensor of means).
All sparsified variants run through the same placement, so the differences are the operator alone.
Overheads are ratios (median of per-round ratios) minus one, against the eager base and against
the faster of the two bases (the best base a user could run); the compiled sparsified model is
compared with the compiled base. Compiling happens in the warm-up round, outside the timings.

    python benchmarks/b1_operator.py [--batch 32] [--rounds 9] [--alpha 0.25] [--device cpu]
"""

from __future__ import annotations


import torch
from torch import nn

from common import MODELS, arguments, images, interleaved, medians, ratio, save
from meansparse_core import attach, native
from meansparse_core.compiled import CompiledModel
from meansparse_core.operator import _COMPILED


class PaperBaseline(nn.Module):
    """The operator as the paper describes it, with the interface of ``meansparse_core.MeanSparse``."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, channel_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor, alpha: float = 0.0, grad: str = "exact") -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        mean, std = self.mean.view(shape), self.std.view(shape)
        means = mean * torch.ones_like(x)
        return torch.where(torch.abs(x - mean) < alpha * std, means, x)

    def relu(self, x: torch.Tensor, alpha: float = 0.0, grad: str = "exact") -> torch.Tensor:
        """The ReLU after the operator, as its own pass (the placement asks for both at tapped ReLUs)."""
        return torch.relu(self(x, alpha, grad))


def with_baseline(model: nn.Module, stats):
    """A second sparsified view of the same model whose operators are the paper baseline."""
    baseline = attach(model, stats)
    device = next(model.parameters()).device  # the statistics may stay on the CPU until first use
    baseline.operators = nn.ModuleList(PaperBaseline(op.mean, op.std, op.channel_dim).to(device)
                                       for op in baseline.operators)
    return baseline


def measure(model: nn.Module, stats, batch: int, rounds: int, alpha: float, device: str) -> dict:
    x = images(batch, device)
    sparse = attach(model, stats)
    baseline = with_baseline(model, stats)
    compiled_base, compiled_sparse = torch.compile(model), CompiledModel(sparse)
    with torch.no_grad():
        assert torch.equal(sparse(x, alpha=alpha), baseline(x, alpha=alpha)), "the baseline computes the same thing"
        times = interleaved({
            "base": lambda: model(x),
            "compiled_base": lambda: compiled_base(x),
            "meansparse": lambda: sparse(x, alpha=alpha),
            "meansparse_unfused": lambda: unfused(lambda: sparse(x, alpha=alpha)),
            "meansparse_compiled": lambda: compiled_sparse(x, alpha),
            "paper_baseline": lambda: baseline(x, alpha=alpha),
        }, rounds)
    best = "compiled_base" if medians(times)["compiled_base"] < medians(times)["base"] else "base"
    overhead = {k: ratio(times, k, "base") - 1 for k in times if k != "base"}
    return {"median_seconds": medians(times), "overhead": overhead, "best_base": best,
            "overhead_vs_best_base": {k: ratio(times, k, best) - 1 for k in ("meansparse", "meansparse_unfused")},
            "compiled_vs_compiled_base": ratio(times, "meansparse_compiled", "compiled_base") - 1,
            "taps": len(stats.taps), "c_kernel": native.available()}


def unfused(run):
    """``run()`` with PyTorch's operations only: no C kernel, no compiled operator."""
    kernels = [native, *_COMPILED.values()]
    for kernel in kernels:
        kernel.enabled = False
    try:
        return run()
    finally:
        for kernel in kernels:
            kernel.enabled = True


def main() -> None:
    parser = arguments(__doc__, rounds=9)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=0.25)
    args = parser.parse_args()
    results = {"batch": args.batch, "rounds": args.rounds, "alpha": args.alpha, "device": args.device, "models": {}}
    print(f"{'model':28} {'base (s)':>9} {'compiled base':>14} {'ours':>8} {'ours vs best base':>18} "
          f"{'ours unfused':>13} {'compiled, vs compiled base':>27} {'paper baseline':>15}")
    for name, build in MODELS.items():
        model, stats = build(args.device)
        r = results["models"][name] = measure(model, stats, args.batch, args.rounds, args.alpha, args.device)
        o = r["overhead"]
        print(f"{name:28} {r['median_seconds']['base']:9.4f} {o['compiled_base'] + 1:13.3f}x {o['meansparse']:+8.1%} "
              f"{r['overhead_vs_best_base']['meansparse']:+18.1%} {o['meansparse_unfused']:+13.1%} "
              f"{r['compiled_vs_compiled_base']:+27.1%} {o['paper_baseline']:+15.1%}")
    save(f"b1_operator_{args.device}", results)


if __name__ == "__main__":
    main()
