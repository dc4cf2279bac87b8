"""The MeanSparse operator: clamp features within alpha*sigma of their channel mean to that mean.

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

GradMode = Literal["exact", "straight-through"]
GRAD_MODES: tuple[str, ...] = get_args(GradMode)


def channel_view(stat: torch.Tensor, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Reshape a per-channel vector so that it broadcasts against ``x`` along ``channel_dim``."""
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return stat.to(dtype=x.dtype, device=x.device).view(shape)


def _sparsify_forward(x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    # `mean` broadcasts inside torch.where, so no full-size tensor of means is ever built.
    return torch.where((x - mean).abs() < band, mean, x)


class _StraightThrough(torch.autograd.Function):
    """Sparsify in the forward pass, pass the gradient through unchanged in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
        return _sparsify_forward(x, mean, band)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None


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

    Returns a tensor shaped like ``x``. Zero-std channels are never clamped and no NaN is created:
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
    mean_b = channel_view(mean, x, channel_dim)
    band = channel_view(std, x, channel_dim) * alpha
    if grad == "straight-through":
        return _StraightThrough.apply(x, mean_b, band)
    return _sparsify_forward(x, mean_b, band)


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
