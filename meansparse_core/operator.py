"""The MeanSparse operator: replace features within alpha*sigma of their channel mean with that mean.

Amini et al., "MeanSparse: Post-Training Robustness Enhancement Through Mean-Centered Feature
Sparsification" (2024). For every channel c with mean mu_c and standard deviation sigma_c:

    y = mu_c   where |x - mu_c| < alpha * sigma_c
    y = x      elsewhere

alpha = 0 is the identity. The true gradient is zero inside the band, which can mask gradients from
an attacker; the straight-through mode uses the identity in the backward pass instead (BPDA).
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import torch
from torch import nn

from . import native
from .fusion import Fused, as_rows

GradMode = Literal["exact", "straight-through"]
GRAD_MODES: tuple[str, ...] = get_args(GradMode)


def channel_view(stat: torch.Tensor, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Reshape a per-channel vector so that it broadcasts against ``x`` along ``channel_dim``."""
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return stat.to(dtype=x.dtype, device=x.device).view(shape)


def _operator_eager(x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, relu: bool = False,
                    mask: GradMode | None = None) -> tuple[torch.Tensor, ...]:
    """(output,) or (output, mask of the gradients that pass) with PyTorch's operations; ``mean`` and
    ``band`` broadcast against ``x``, so no full-size tensor of means is ever built.

    The mask is what autograd derives for ``torch.where`` and ReLU: exact gradients stop inside the
    band, and the ReLU's own gradient stops where its output is <= 0 (NaN passes, as in PyTorch).
    """
    inside = (x - mean).abs() < band
    y = torch.where(inside, mean, x)
    if relu:
        y = torch.relu(y)
    if mask is None:
        return (y,)
    if not relu:
        return y, ~inside
    passes = ~(y <= 0)
    return y, (~inside & passes) if mask == "exact" else passes


def _sparsify_eager(x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor) -> tuple[torch.Tensor]:
    return _operator_eager(x, mean, band)


def _sparsify_with_mask_eager(x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return _operator_eager(x, mean, band, mask="exact")


# Compiled kernels for the devices and dtypes the C kernel does not take (two functions, not one
# with flags: TorchDynamo keeps its compiled variants per function and limits how many).
_COMPILED = {None: Fused(_sparsify_eager), "exact": Fused(_sparsify_with_mask_eager)}


def _masks(grad: str, relu: bool) -> bool:
    """Whether the backward pass needs a mask: everywhere but the operator alone under straight-through."""
    return not (grad == "straight-through" and not relu)


def _in_layout_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` laid out as ``torch.empty_like(x)`` is (what the fake implementation promises compilers)."""
    if y.stride() == x.stride():
        return y
    out = torch.empty_like(x, dtype=y.dtype)
    if out.stride() == y.stride():
        return y
    return out.copy_(y)


def _generic_kernel(x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, channel_dim: int, relu: bool,
                    mask: GradMode | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch's operations, compiled where that pays (``fusion.py``): GPUs and any device but the CPU."""
    fused = _COMPILED[mask] if not relu else None  # ReLU is fused by the C kernel only (routing.py)
    view = as_rows(x, channel_dim) if fused is not None and fused.worth_it(x) else None
    if view is None:
        out = _operator_eager(x, channel_view(mean, x, channel_dim), channel_view(band, x, channel_dim), relu, mask)
    else:
        rows, back = view
        out = tuple(back(t) for t in fused(rows, mean.view(1, -1, 1), band.view(1, -1, 1)))
    # The compiled path returns views of its kernel's output: an operator's outputs are tensors of their own.
    out = tuple(_in_layout_of(x, t if t._base is None else t.clone()) for t in out)
    return out[0], (out[1] if len(out) > 1 else None)


def _cpu_kernel(x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, channel_dim: int, relu: bool,
                mask: GradMode | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The C kernel where it runs (``native.py``), else the generic kernel."""
    if native.usable(x, channel_dim):
        return native.run(x, mean, band, channel_dim, relu, mask)
    return _generic_kernel(x, mean, band, channel_dim, relu, mask)


def _operator(x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, channel_dim: int, relu: bool,
              mask: GradMode | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The operator (then ReLU if ``relu``) and where gradients pass (None: everywhere); no autograd.

    ``mean`` and ``band`` (alpha * std) are per-channel vectors. The C kernel runs it on CPUs, a
    compiled kernel where that pays (``fusion.py``), PyTorch's operations elsewhere: all alike, bit for bit.
    """
    if mask is not None and not _masks(mask, relu):
        mask = None  # the operator alone passes every gradient: nothing to mask
    kernel = _cpu_kernel if x.device.type == "cpu" else _generic_kernel
    return kernel(x, mean, band, channel_dim, relu, mask)


# --- the operator registered with PyTorch -----------------------------------------------------------
# ``meansparse::sparsify`` is what torch.compile and torch.export see: one node per tap, with a fake
# (meta) implementation for tracing and an autograd formula. Its second output is the one-byte mask
# of the gradients that pass, written only when ``save_mask`` (an empty tensor otherwise).


def _registered(kernel: Callable) -> Callable:
    """``kernel`` with the registered operator's arguments and outputs."""
    def run(x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, channel_dim: int, relu: bool, grad: str,
            save_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        y, keep = kernel(x, mean, band, channel_dim, relu, grad if save_mask and _masks(grad, relu) else None)
        return y, keep if keep is not None else x.new_empty(0, dtype=torch.bool)
    return run


@torch.library.custom_op("meansparse::sparsify", mutates_args=())
def sparsify_op(x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, channel_dim: int, relu: bool, grad: str,
                save_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MeanSparse with band ``alpha * std`` (then ReLU if ``relu``): (output, mask of passing gradients or empty).

    Every device but the CPU: PyTorch's operations (``_generic_kernel``). Under ``torch.compile`` on
    a GPU, ``register_inductor_decompositions`` lets Inductor fuse them with their neighbours.
    """
    return _registered(_generic_kernel)(x, mean, band, channel_dim, relu, grad, save_mask)


sparsify_op.register_kernel("cpu")(_registered(_cpu_kernel))


@sparsify_op.register_fake
def _sparsify_fake(x, mean, band, channel_dim, relu, grad, save_mask):
    keep_like = x if save_mask and _masks(grad, relu) else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(keep_like, dtype=torch.bool)


@torch.library.custom_op("meansparse::masked", mutates_args=())
def masked_op(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``torch.where(keep, grad, 0)``: the backward pass of ``meansparse::sparsify`` (C kernel on the CPU)."""
    return _in_layout_of(grad, torch.where(keep, grad, 0.0))


masked_op.register_kernel("cpu")(lambda grad, keep: _in_layout_of(grad, native.masked(grad, keep)))
masked_op.register_fake(lambda grad, keep: torch.empty_like(grad))


def _gradient(ctx, grad_output: torch.Tensor, masked: Callable) -> torch.Tensor:
    """Exact: zero inside the band (and where the ReLU is off); straight-through: ReLU's gradient only."""
    if ctx.passes_all:
        return grad_output
    (keep,) = ctx.saved_tensors
    if keep.shape != grad_output.shape:
        raise RuntimeError("meansparse::sparsify ran with save_mask=False, so it kept no mask for its gradient; "
                           "call it with save_mask=True where gradients are needed.")
    return masked(grad_output, keep)


def _save_mask(ctx, inputs, output) -> None:
    *_, relu, grad, _ = inputs
    ctx.passes_all = not _masks(grad, relu)
    ctx.save_for_backward(output[1])


sparsify_op.register_autograd(
    lambda ctx, grad_output, _: (_gradient(ctx, grad_output, torch.ops.meansparse.masked), *[None] * 6),
    setup_context=_save_mask)


class _EagerGradient(torch.autograd.Function):
    """The registered operator's autograd formula, called directly when nothing traces the model.

    The dispatcher's Python layers cost tens of microseconds per call in each direction, several
    percent of an attack step on one image; this runs the same kernels and the same ``_gradient``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, channel_dim: int, grad: GradMode,
                relu: bool) -> torch.Tensor:
        y, keep = _operator(x, mean, band, channel_dim, relu, grad)
        ctx.passes_all = keep is None
        if keep is not None:
            ctx.save_for_backward(keep)
        return y

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return _gradient(ctx, grad_output, native.masked), None, None, None, None, None


def _decomposed(x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, channel_dim: int, relu: bool, grad: str,
                save_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``meansparse::sparsify`` as PyTorch's operations, for compilers and standalone exported programs."""
    y, *keep = _operator_eager(x, channel_view(mean, x, channel_dim), channel_view(band, x, channel_dim), relu,
                               grad if save_mask and _masks(grad, relu) else None)
    return y, keep[0] if keep else x.new_empty(0, dtype=torch.bool)


def _masked_decomposed(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, grad, 0.0)


#: Both operators as PyTorch's own operations: ``ExportedProgram.run_decompositions(DECOMPOSITIONS)``.
DECOMPOSITIONS = {torch.ops.meansparse.sparsify.default: _decomposed,
                  torch.ops.meansparse.masked.default: _masked_decomposed}


def register_inductor_decompositions() -> None:
    """Let Inductor see the operator as PyTorch's operations, to fuse it with its neighbours.

    Inductor on every device (its fused CPU loops round as the eager operations do: tests check it);
    eagerly and under other backends the operator's own kernels run (the C kernel on CPUs). Called by
    ``compiled.py``; imports Inductor, so it is not done at import. On GPUs this is what B6's device
    script measures; the suite runs on CPUs only.
    """
    from torch._inductor import decomposition

    for op, decompose in DECOMPOSITIONS.items():
        for table in (decomposition.decompositions, decomposition.fast_random_decomps()):  # the second is a cached copy
            table.setdefault(op, decompose)


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
    return _apply(x, mean, std, alpha, channel_dim, grad, relu=False)


def sparsify_relu(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, alpha: float, channel_dim: int = 1,
                  grad: GradMode = "exact") -> torch.Tensor:
    """``torch.relu(sparsify(x, ...))`` in one pass over memory where the CPU kernel runs, bit for bit.

    The backward pass of both is one masked copy, as cheap as ReLU's own.
    """
    return _apply(x, mean, std, alpha, channel_dim, grad, relu=True)


def _cast(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, alpha: float | torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and the band ``alpha * std`` in ``x``'s dtype, on its device."""
    return mean.to(dtype=x.dtype, device=x.device), std.to(dtype=x.dtype, device=x.device) * alpha


def _apply(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, alpha: float | torch.Tensor, channel_dim: int,
           grad: GradMode, relu: bool, cast: Callable = _cast) -> torch.Tensor:
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}.")
    # A tensor alpha is a compiled graph's input (compiled.py), checked by its caller: reading its
    # value here would tie the graph to it. At 0 its band is empty, which leaves x as it is.
    if not isinstance(alpha, torch.Tensor):
        if not alpha >= 0:  # also refuses NaN, which would silently switch the operator off
            raise ValueError(f"alpha must be a number >= 0, got {alpha}.")
        if alpha == 0:
            return torch.relu(x) if relu else x
    channel_dim = channel_dim % x.dim()
    if x.shape[channel_dim] != mean.numel() or mean.numel() != std.numel():
        raise ValueError(
            f"features have {x.shape[channel_dim]} channels on axis {channel_dim} "
            f"but the statistics have {mean.numel()} means and {std.numel()} stds."
        )
    mean, band = cast(x, mean, std, alpha)
    save_mask = torch.is_grad_enabled() and x.requires_grad
    if torch.compiler.is_compiling():  # torch.compile and torch.export see the registered operator
        return torch.ops.meansparse.sparsify(x, mean, band, channel_dim, relu, grad, save_mask)[0]
    # Eagerly, its kernels and autograd formula without the dispatcher's per-call cost (_EagerGradient).
    if save_mask:
        return _EagerGradient.apply(x, mean, band, channel_dim, grad, relu)
    return _operator(x, mean, band, channel_dim, relu, None)[0]


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
        return _apply(x, self.mean, self.std, alpha, self.channel_dim, grad, relu=False, cast=self._cast)

    def relu(self, x: torch.Tensor, alpha: float = 0.0, grad: GradMode = "exact") -> torch.Tensor:
        """``torch.relu(self(x, alpha, grad))`` in one pass (``sparsify_relu``)."""
        return _apply(x, self.mean, self.std, alpha, self.channel_dim, grad, relu=True, cast=self._cast)

    def _cast(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, alpha: float | torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_cast``, kept from the last call while the buffers, alpha, dtype and device stay the same.

        A forward pass calls each tap once and a slider or an attack makes many passes at one alpha;
        computing the band anew costs a multiplication, a copy and an allocation per tap, several
        percent of a small model's pass. The last result is one tuple, swapped whole, so threads
        sharing the module never see half of another thread's entry.
        """
        if isinstance(alpha, torch.Tensor) or torch.compiler.is_compiling():
            return _cast(x, mean, std, alpha)
        key = (alpha, x.dtype, x.device, mean._version, std._version)
        last = self.__dict__.get("_last_cast")
        if last is None or last[0] is not mean or last[1] is not std or last[2] != key:
            last = self.__dict__["_last_cast"] = (mean, std, key, *_cast(x, mean, std, alpha))
        return last[3], last[4]

    def extra_repr(self) -> str:
        return f"channels={self.mean.numel()}, channel_dim={self.channel_dim}"
