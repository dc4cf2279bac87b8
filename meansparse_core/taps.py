"""What a tap is: one place where MeanSparse can go, found in a forward pass.

A *tap* is the input of an activation called as a function (``F.relu``, ``torch.relu``, ``x.relu()``,
``F.silu``, ...), the input of an activation module, the input or output of a module named by a
placement rule, the result of a tensor addition in a named module's forward, or one of the
RobustBench ``MeanSparse`` layers a released model (``Amini2024MeanSparse_*``) carries.

Tap names are stable across passes: ``layer1.0.relu`` for an activation module, ``layer1.0:relu``
for a functional call made in ``layer1.0``'s forward, ``layer1.0:input`` / ``layer1.0:output`` for a
module's input or output, ``layer1.0:add`` for an addition made in its forward, with ``#2``, ``#3``...
for repeated calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

TapKind = Literal["function", "module", "robustbench", "input", "output", "sum"]

# Functional activations, keyed to the short name used in tap names.
ACTIVATION_FUNCTIONS: dict[Callable, str] = {
    fn: name
    for name, fns in {
        "relu": (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_),
        "relu6": (F.relu6,),
        "leaky_relu": (F.leaky_relu, F.leaky_relu_),
        "elu": (F.elu, F.elu_),
        "selu": (F.selu, torch.selu),
        "celu": (F.celu, torch.celu),
        "prelu": (F.prelu, torch.prelu),
        "rrelu": (F.rrelu,),
        "gelu": (F.gelu,),
        "silu": (F.silu,),
        "mish": (F.mish,),
        "hardswish": (F.hardswish,),
        "softplus": (F.softplus,),
    }.items()
    for fn in fns
}

# Tensor additions, as a TorchFunctionMode sees them (``a + b`` arrives as Tensor.add).
ADDITIONS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
             torch.Tensor.__iadd__}
# Activation modules by class name, so that custom ones (DeepMind's Swish, timm's GELU) count too.
_ACTIVATION_CLASS = re.compile(r"relu|elu|silu|swish|gelu|mish|softplus", re.IGNORECASE)


@dataclass(frozen=True)
class Tap:
    """One activation call site: its name, how it is caught, and its channel layout."""

    name: str
    kind: TapKind
    channel_dim: int
    channels: int


def is_robustbench_meansparse(module: nn.Module) -> bool:
    """True for the MeanSparse layers of RobustBench's ``Amini2024MeanSparse_*`` architectures."""
    return "meansparse" in type(module).__name__.lower() and all(
        hasattr(module, b) for b in ("running_mean", "running_var", "threshold")
    )


def is_activation_module(module: nn.Module) -> bool:
    """True for activation modules by class name, so that custom ones (DeepMind's Swish) count too."""
    return bool(_ACTIVATION_CLASS.search(type(module).__name__)) and not is_robustbench_meansparse(module)


def channel_width(module: nn.Module) -> tuple[int, int] | None:
    """(preferred channel axis, width) of a layer's output, used to tell NCHW from NHWC/NLC."""
    if isinstance(module, nn.Linear):
        return -1, module.out_features
    if isinstance(module, nn.LayerNorm):
        return -1, module.normalized_shape[-1]
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1, module.out_channels
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return 1, module.num_features
    if isinstance(module, nn.GroupNorm):
        return 1, module.num_channels
    return None


def channel_dim(x: torch.Tensor, hint: tuple[int, int] | None) -> int:
    """Channel axis of an activation's input, from the width of the layer that ran last."""
    if x.dim() <= 2:
        return x.dim() - 1
    if hint is not None:
        preferred, width = hint
        for axis in (preferred % x.dim(), 1, x.dim() - 1):
            if x.shape[axis] == width:
                return axis
    return x.dim() - 1 if x.dim() == 3 else 1


def module_part(tap_name: str) -> str:
    """The module a tap belongs to: ``layer1.0`` for ``layer1.0:relu#2``, ``layer1.0.relu`` for itself."""
    return tap_name.split(":")[0].split("#")[0]


def own_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The RobustBench MeanSparse layers a model carries (``Amini2024MeanSparse_*``), by name."""
    return {name: m for name, m in model.named_modules() if is_robustbench_meansparse(m)}
