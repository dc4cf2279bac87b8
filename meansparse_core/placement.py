"""Placement: find every activation of a model, route its input through MeanSparse, and undo it.

A *tap* is one call site of an activation: a functional call (``F.relu``, ``torch.relu``,
``x.relu()``, ``F.silu``, ...), caught with a ``TorchFunctionMode``, or an activation module whose
forward calls no such function (custom ``Swish`` modules), caught with a forward pre-hook. Models
that already contain RobustBench ``MeanSparse`` layers (``Amini2024MeanSparse_*``) keep exactly
those layers as their taps, driven by our alpha instead of their stored threshold.

Nothing about a forward pass is stored on the model: the hooks read a per-pass state from a
``ContextVar``, so one model can serve several threads with different alphas at once.

Tap names are stable across passes: ``layer1.0.relu`` for an activation module, ``layer1.0:relu``
for a functional call made in ``layer1.0``'s forward, with ``#2``, ``#3``... for repeated calls.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections import Counter
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .operator import GradMode, MeanSparse

if TYPE_CHECKING:
    from .statistics import Statistics

TapKind = Literal["function", "module", "robustbench"]
Handler = Callable[["Tap", torch.Tensor], torch.Tensor]

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


def _is_activation_module(module: nn.Module) -> bool:
    return bool(_ACTIVATION_CLASS.search(type(module).__name__)) and not is_robustbench_meansparse(module)


def _channel_width(module: nn.Module) -> tuple[int, int] | None:
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


def _channel_dim(x: torch.Tensor, hint: tuple[int, int] | None) -> int:
    """Channel axis of an activation's input, from the width of the layer that ran last."""
    if x.dim() <= 2:
        return x.dim() - 1
    if hint is not None:
        preferred, width = hint
        for axis in (preferred % x.dim(), 1, x.dim() - 1):
            if x.shape[axis] == width:
                return axis
    return x.dim() - 1 if x.dim() == 3 else 1


class _Pass:
    """State of one forward pass: which taps to route and to whom, and where the pass is."""

    def __init__(self, handler: Handler | None, taps: Mapping[str, Tap] | None) -> None:
        self.handler = handler
        self.taps = taps  # None while discovering
        # Activation modules caught by a pre-hook (no functional activation inside them).
        self.module_taps = {t.name.split("#")[0] for t in (taps or {}).values() if t.kind == "module"}
        self.scopes: list[tuple[nn.Module, str]] = []
        self.calls: Counter[str] = Counter()
        # Discovery only.
        self.found: list[Tap] = []
        self.width_hint: tuple[int, int] | None = None
        self.found_at_entry: list[int] = []

    def call_name(self, base: str) -> str:
        self.calls[base] += 1
        count = self.calls[base]
        return base if count == 1 else f"{base}#{count}"

    def route(self, name: str, kind: TapKind, x: torch.Tensor) -> torch.Tensor:
        if self.taps is None:
            axis = _channel_dim(x, self.width_hint)
            self.found.append(Tap(name, kind, axis, x.shape[axis]))
            return x
        tap = self.taps.get(name)
        return x if tap is None else self.handler(tap, x)


_current: ContextVar[_Pass | None] = ContextVar("meansparse_pass", default=None)


class _ActivationCalls(TorchFunctionMode):
    """Routes the input of every functional activation call to the current pass."""

    def __init__(self, router: "_Router") -> None:
        super().__init__()
        self.router = router

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = ACTIVATION_FUNCTIONS.get(func)
        state = _current.get()
        if state is not None and state.scopes and state.scopes[-1][1] in state.module_taps:
            op = None  # the call inside an activation module whose pre-hook has already routed its input
        if op is not None and state is not None and args and isinstance(args[0], torch.Tensor):
            name = state.call_name(self.router.function_tap_base(state, op))
            args = (state.route(name, "function", args[0]), *args[1:])
        return func(*args, **kwargs)


class _Router:
    """Hooks on every submodule of one model; inert unless a pass is active in this context."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {m: n for n, m in model.named_modules()}
        self.activation_modules = {m for m in self.names if _is_activation_module(m)}
        # PyTorch's own activation modules apply their function to their input and nothing else, so
        # a pre-hook catches them as well as the function mode does, without its cost per operation.
        self.torch_activations = {self.names[m] for m in self.activation_modules
                                  if type(m).__module__ == nn.ReLU.__module__}
        self.robustbench_layers = {m for m in self.names if is_robustbench_meansparse(m)}
        self.users = 0
        self.handles = [h for m in self.names for h in (
            m.register_forward_pre_hook(self._enter),
            m.register_forward_hook(self._leave),
        )]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def cheapest(self, taps: list[Tap]) -> list[Tap]:
        """``taps`` with functional calls inside PyTorch's activation modules caught by the modules' pre-hooks."""
        return [replace(t, kind="module") if t.kind == "function" and t.name.split("#")[0] in self.torch_activations
                else t for t in taps]

    def function_tap_base(self, state: _Pass, op: str) -> str:
        module, name = state.scopes[-1] if state.scopes else (None, "")
        if module in self.activation_modules:
            return name
        return f"{name}:{op}" if name else op

    def _enter(self, module: nn.Module, args: tuple):
        state = _current.get()
        if state is None:
            return None
        name = self.names[module]
        state.scopes.append((module, name))
        if state.taps is None:
            state.found_at_entry.append(len(state.found))
            return None
        if name in state.module_taps and args:
            return (state.route(state.call_name(name), "module", args[0]), *args[1:])
        return None

    def _leave(self, module: nn.Module, args: tuple, output):
        state = _current.get()
        if state is None:
            return None
        state.scopes.pop()
        if state.taps is None:
            self._discover_after(state, module, args)
        elif module in self.robustbench_layers:
            return state.route(state.call_name(self.names[module]), "robustbench", args[0])
        return None

    def _discover_after(self, state: _Pass, module: nn.Module, args: tuple) -> None:
        found_inside = len(state.found) - state.found_at_entry.pop()
        name = self.names[module]
        if module in self.robustbench_layers:
            state.route(state.call_name(name), "robustbench", args[0])
        elif module in self.activation_modules and found_inside == 0 and args:
            state.route(state.call_name(name), "module", args[0])
        if (hint := _channel_width(module)) is not None:
            state.width_hint = hint


# Per (object, attribute): [blocks using the changed value, the value to restore after the last one].
_borrowed: dict[tuple[int, str], list] = {}
_borrowed_lock = threading.Lock()


@contextmanager
def _borrow(objects: Iterable, attribute: str, value: bool, assign: Callable[[object, bool], None]) -> Iterator[None]:
    """Give every object's ``attribute`` the ``value`` for a block, shared by concurrent blocks.

    Sessions share cached models, so two blocks on two threads can overlap: the first one in
    records each object's own value, the last one out restores it. A plain save-and-restore would
    let the first block to finish switch the model back under the other.
    """
    objects = list(objects)
    with _borrowed_lock:
        for obj in objects:
            held = _borrowed.setdefault((id(obj), attribute), [0, getattr(obj, attribute)])
            held[0] += 1
            assign(obj, value)
    try:
        yield
    finally:
        with _borrowed_lock:
            for obj in objects:
                held = _borrowed[(id(obj), attribute)]
                held[0] -= 1
                if held[0] == 0:
                    del _borrowed[(id(obj), attribute)]
                    assign(obj, held[1])


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval mode, then give every submodule back its own mode.

    Per module rather than ``model.train(was_training)``: a shared model whose parts are in mixed
    modes gets exactly its modes back, and a wrapper's flag can never switch the model it wraps.
    """
    with _borrow(model.modules(), "training", False, lambda module, flag: setattr(module, "training", flag)):
        yield model


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with no parameter of ``model`` requiring gradients, then restore each one's flag.

    Attacks differentiate with respect to the input only: frozen weights collect no ``.grad``
    (some reference attacks call ``backward()``) and backward passes skip the weight gradients.
    """
    with _borrow(model.parameters(), "requires_grad", False, lambda p, flag: p.requires_grad_(flag)):
        yield model


_routers: "weakref.WeakKeyDictionary[nn.Module, _Router]" = weakref.WeakKeyDictionary()
_routers_lock = threading.Lock()


@contextmanager
def _routing(model: nn.Module) -> Iterator[_Router]:
    """Install the model's router for the duration of the block (shared by nested users)."""
    with _routers_lock:
        router = _routers.get(model) or _routers.setdefault(model, _Router(model))
        router.users += 1
    try:
        yield router
    finally:
        with _routers_lock:
            router.users -= 1
            if router.users == 0:
                router.remove()
                # pop, not del: when a SparseModel is garbage-collected its model may be gone already.
                _routers.pop(model, None)


def _run(router: _Router, state: _Pass, model: nn.Module, args: tuple, kwargs: dict, functional: bool):
    token = _current.set(state)
    try:
        with _ActivationCalls(router) if functional else nullcontext():
            return model(*args, **kwargs)
    finally:
        _current.reset(token)


@torch.no_grad()
def find_taps(model: nn.Module, example: torch.Tensor) -> list[Tap]:
    """List the taps of ``model`` in forward order, from one forward pass on ``example`` (eval mode)."""
    state = _Pass(handler=None, taps=None)
    with eval_mode(model), _routing(model) as router:
        _run(router, state, model, (example,), {}, functional=True)
    robustbench_taps = [t for t in state.found if t.kind == "robustbench"]
    taps = robustbench_taps or state.found
    if not taps:
        raise ValueError(
            f"No activation found in {type(model).__name__}: MeanSparse sits in front of "
            "activations such as ReLU, SiLU or GELU."
        )
    return taps


def route_taps(model: nn.Module, taps: list[Tap], handler: Handler, *args, **kwargs):
    """Run ``model(*args, **kwargs)`` once with each tap's input replaced by ``handler(tap, x)``."""
    with _routing(model) as router:
        taps = router.cheapest(taps)
        state = _Pass(handler, {t.name: t for t in taps})
        return _run(router, state, model, args, kwargs, any(t.kind == "function" for t in taps))


class SparseModel(nn.Module):
    """A model with MeanSparse in front of its activations; alpha is chosen per call.

    The wrapped model's weights are shared, not copied, and never modified; ``detach()`` removes
    every hook. Example::

        sparse = attach(model, stats)
        logits = sparse(x, alpha=0.25)
        attackable = sparse.at(alpha=0.25, grad="straight-through")   # an nn.Module for attacks
    """

    def __init__(self, model: nn.Module, stats: "Statistics") -> None:
        super().__init__()
        self.model = model
        self.stats = stats
        self.taps = stats.tap_list
        self.operators = nn.ModuleList(
            MeanSparse(s.mean, s.std, s.tap.channel_dim) for s in stats.taps
        )
        self._index = {t.name: i for i, t in enumerate(self.taps)}
        self._attachment = _routing(model)
        self._router = self._attachment.__enter__()
        routed = self._router.cheapest(self.taps)
        self._by_name = {t.name: t for t in routed}  # built once: forward runs on every slider move
        self._functional = any(t.kind == "function" for t in routed)
        self.train(model.training)  # a fresh nn.Module says "training"; say what the model is in

    def forward(
        self,
        x: torch.Tensor,
        alpha: float,
        grad: GradMode = "exact",
        layer_alphas: Mapping[str, float] | None = None,
    ) -> torch.Tensor:
        """Logits with MeanSparse at ``alpha`` (``layer_alphas`` overrides it for named taps)."""
        layer_alphas = layer_alphas or {}
        unknown = set(layer_alphas) - set(self._index)
        if unknown:
            raise KeyError(f"No tap named {sorted(unknown)[0]!r}; see SparseModel.taps for the names.")

        def handler(tap: Tap, features: torch.Tensor) -> torch.Tensor:
            operator = self.operators[self._index[tap.name]]
            return operator(features, layer_alphas.get(tap.name, alpha), grad)

        state = _Pass(handler, self._by_name)
        return _run(self._router, state, self.model, (x,), {}, self._functional)

    def at(self, alpha: float, grad: GradMode = "exact", layer_alphas: Mapping[str, float] | None = None) -> "FixedAlpha":
        """A light ``nn.Module`` view with these settings frozen, e.g. for torchattacks."""
        return FixedAlpha(self, alpha, grad, layer_alphas)

    def detach(self) -> nn.Module:
        """Remove MeanSparse from the model and return the untouched original model."""
        if self._attachment is not None:
            self._attachment.__exit__(None, None, None)
            self._attachment = None
        return self.model


class FixedAlpha(nn.Module):
    """A ``SparseModel`` with alpha, gradient mode and per-layer alphas fixed: ``forward(x)``."""

    def __init__(self, sparse: SparseModel, alpha: float, grad: GradMode, layer_alphas: Mapping[str, float] | None) -> None:
        super().__init__()
        self.sparse = sparse
        self.alpha = float(alpha)
        self.grad = grad
        self.layer_alphas = dict(layer_alphas or {})
        self.train(sparse.training)  # mirror the wrapped model's mode instead of nn.Module's default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparse(x, self.alpha, self.grad, self.layer_alphas)


def attach(model: nn.Module, stats: "Statistics") -> SparseModel:
    """Put MeanSparse with ``stats`` in front of every activation of ``model``."""
    return SparseModel(model, stats)
