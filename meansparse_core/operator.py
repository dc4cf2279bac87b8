"""The MeanSparse operator: replace features within alpha*sigma of their channel mean with that mean.

Amini et al., "MeanSparse: Post-Training Robustness Enhancement Through Mean-Centered Feature
Sparsification" (2024). For every channel c with mean mu_c and standard deviation sigma_c:

    y = mu_c   where |x - mu_c| < alpha * sigma_c
    y = x      elsewhere

alpha = 0 is the identity. The true gradient is zero inside the band, which can mask gradients from
an attacker; the straight-through mode uses the identity in the backward pass instead (BPDA).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from .fusion import Fused, as_rows

GradMode = Literal["exact", "straight-through"]
GRAD_MODES: tuple[str, ...] = get_args(GradMode)


def channel_view(stat: torch.Tensor, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Reshape a per-channel vector so that it broadcasts against ``x`` along ``channel_dim``."""
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return stat.to(dtype=x.dtype, device=x.device).view(shape)


def _sparsify_eager(x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    # `mean` broadcasts inside torch.where, so no full-size tensor of means is ever built.
    return torch.where((x - mean).abs() < band, mean, x)


def _exact_gradient_eager(x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    # What autograd derives for torch.where above: nothing flows back from inside the band.
    return torch.where((x - mean).abs() < band, 0.0, grad)


_fused_sparsify, _fused_exact_gradient = Fused(_sparsify_eager), Fused(_exact_gradient_eager)


def _per_channel(fused: Fused, x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, channel_dim: int,
                 *more: torch.Tensor) -> torch.Tensor:
    """``fused.fn(x, mean, band, *more)`` with per-channel vectors ``mean`` and ``band`` (alpha * std).

    Runs the compiled kernel on canonical rows when it pays and every tensor has ``x``'s layout,
    else the eager function on broadcast views; no autograd either way.
    """
    views = [as_rows(t, channel_dim) for t in (x, *more)] if fused.worth_it(x) and all(
        t.stride() == x.stride() for t in more) else [None]
    if views[0] is None:
        return fused.fn(x, channel_view(mean, x, channel_dim), channel_view(band, x, channel_dim), *more)
    (rows, back), more_rows = views[0], [v[0] for v in views[1:]]
    return back(fused(rows, mean.view(1, -1, 1), band.view(1, -1, 1), *more_rows))


class _Sparsify(torch.autograd.Function):
    """The operator with its gradient written out, so both passes can be fused kernels.

    Exact: the gradient is zero inside the band and passes elsewhere (what autograd derives for
    ``torch.where``). Straight-through (BPDA): the gradient passes everywhere.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, channel_dim: int,
                straight_through: bool) -> torch.Tensor:
        ctx.channel_dim, ctx.straight_through = channel_dim, straight_through
        if not straight_through:
            ctx.save_for_backward(x, mean, band)
        y = _per_channel(_fused_sparsify, x, mean, band, channel_dim)
        # The fused path returns a view of the kernel's output; autograd forbids changing a custom
        # Function's view in place, which torchvision's ResNets do next (ReLU(inplace=True)).
        return y.clone() if y._base is not None else y

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.straight_through:
            return grad_output, None, None, None, None
        x, mean, band = ctx.saved_tensors
        return _per_channel(_fused_exact_gradient, x, mean, band, ctx.channel_dim, grad_output), None, None, None, None


def sparsify(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    alpha: float,
    channel_dim: int = 1,
    grad: GradMode = "exact",
) -> torch.Tensor:
    """Apply MeanSparse to ``x`` with per-channel ``mean`` and ``std`` (vectors of length C).

    Args:
        x: features, any shape; the channel axis is ``channel_dim`` (1 for (N,C,H,W) and (N,C),
            -1 for channel-last (N,L,C) or (N,H,W,C)).
        mean, std: per-channel statistics, shape (C,).
        alpha: band half-width in units of std; 0 returns ``x`` itself.
        grad: "exact" (true gradient, zero inside the band) or "straight-through" (identity, BPDA).

    Returns a tensor shaped like ``x``. Zero-std channels are never replaced and no NaN is created:
    NaN compares false, so it passes through unchanged. Example::

        y = sparsify(features, mean, std, alpha=0.25)
    """
    if not alpha >= 0:  # also refuses NaN, which would silently switch the operator off
        raise ValueError(f"alpha must be a number >= 0, got {alpha}.")
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}.")
    if alpha == 0:
        return x
    channel_dim = channel_dim % x.dim()
    if x.shape[channel_dim] != mean.numel() or mean.numel() != std.numel():
        raise ValueError(
            f"features have {x.shape[channel_dim]} channels on axis {channel_dim} "
            f"but the statistics have {mean.numel()} means and {std.numel()} stds."
        )
    mean = mean.to(dtype=x.dtype, device=x.device)
    band = std.to(dtype=x.dtype, device=x.device) * alpha
    if torch.is_grad_enabled() and x.requires_grad:
        return _Sparsify.apply(x, mean, band, channel_dim, grad == "straight-through")
    return _per_channel(_fused_sparsify, x, mean, band, channel_dim)


class MeanSparse(nn.Module):
    """MeanSparse for one layer: fixed per-channel statistics; alpha and gradient mode per call.

    Keeping alpha out of the module's state lets one set of weights and statistics serve many
    callers with different thresholds at once. Example::

        layer = MeanSparse(mean, std, channel_dim=1)
        y = layer(x, alpha=0.25, grad="straight-through")
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, channel_dim: int = 1) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).flatten().clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).flatten().clone())
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor, alpha: float = 0.0, grad: GradMode = "exact") -> torch.Tensor:
        return sparsify(x, self.mean, self.std, alpha, self.channel_dim, grad)

    def extra_repr(self) -> str:
        return f"channels={self.mean.numel()}, channel_dim={self.channel_dim}"
