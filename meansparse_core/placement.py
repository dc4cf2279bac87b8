"""Placement: find where MeanSparse goes in a model, route those features through it, and undo it.

Where it goes is a placement rule (``placement_rules.py``). A *tap* is one place: the input of an
activation called as a function (``F.relu``, ``torch.relu``, ``x.relu()``, ``F.silu``, ...), caught
with a ``TorchFunctionMode``; the input of an activation module whose forward calls no such function
(custom ``Swish`` modules), caught with a forward pre-hook; the input or output of a module named by
a rule (hooks); or the result of a tensor addition in a named module's forward (the function mode).
Models that already contain RobustBench ``MeanSparse`` layers (``Amini2024MeanSparse_*``) keep
exactly those layers as their taps, driven by our alpha instead of their stored threshold.

Nothing about a forward pass is stored on the model: the hooks read a per-pass state from a
``ContextVar``, so one model can serve several threads with different alphas at once.

Tap names are stable across passes: ``layer1.0.relu`` for an activation module, ``layer1.0:relu``
for a functional call made in ``layer1.0``'s forward, ``layer1.0:input`` / ``layer1.0:output`` for a
module's input or output, ``layer1.0:add`` for an addition made in its forward, with ``#2``, ``#3``...
for repeated calls.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections import Counter
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, replace
from types import MethodType
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import native
from .operator import GradMode, MeanSparse
from .placement_rules import ACTIVATIONS, OWN_LAYERS, Placement, name_matches, resolve

if TYPE_CHECKING:
    from .statistics import Statistics

TapKind = Literal["function", "module", "robustbench", "input", "output", "sum"]
Handler = Callable[["Tap", torch.Tensor], torch.Tensor]
# A tapped ReLU's output in one call (operator and activation fused), or None to run them apart.
ReluHandler = Callable[["Tap", torch.Tensor], "torch.Tensor | None"]

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
# Taps caught by the function mode; a pass without them runs without its per-operation cost.
_FUNCTION_MODE_KINDS = {"function", "sum"}

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


def _module_part(tap_name: str) -> str:
    """The module a tap belongs to: ``layer1.0`` for ``layer1.0:relu#2``, ``layer1.0.relu`` for itself."""
    return tap_name.split(":")[0].split("#")[0]


class _Pass:
    """State of one forward pass: which taps to route and to whom, and where the pass is.

    While discovering (``taps`` is None), ``placement`` says which modules' inputs, outputs and
    additions are taps; otherwise the tap names say it.
    """

    def __init__(self, router: "_Router", handler: Handler | None, taps: Mapping[str, Tap] | None,
                 placement: Placement = ACTIVATIONS, relu_handler: ReluHandler | None = None) -> None:
        self.router = router
        self.handler = handler
        self.relu_handler = relu_handler
        self.taps = taps  # None while discovering
        # Whether the pass needs the function mode, and with it the stack of modules it is in. Without
        # it, a pass costs a few dictionary look-ups per module, not a Python call per torch function.
        self.functional = taps is None or any(t.kind in _FUNCTION_MODE_KINDS for t in taps.values())
        if taps is None:
            names = list(router.names.values())
            chosen = {w: {n for n in names for r in placement.rules if r.where == w and name_matches(r.pattern, n)}
                      for w in ("input", "output", "additions")}
            self.inputs, self.outputs, self.sum_scopes = chosen["input"], chosen["output"], chosen["additions"]
            self.module_taps: set[str] = set()
        else:
            by_kind: dict[str, set[str]] = {}
            for t in taps.values():
                by_kind.setdefault(t.kind, set()).add(_module_part(t.name))
            # Activation modules caught by a pre-hook (no functional activation inside them).
            self.module_taps = by_kind.get("module", set())
            self.inputs, self.outputs = by_kind.get("input", set()), by_kind.get("output", set())
            self.sum_scopes = by_kind.get("sum", set())
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

    def route_relu(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The output of a tapped ReLU, operator included, from the ReLU handler; None: route the input."""
        tap = self.taps.get(name) if self.taps is not None and self.relu_handler is not None else None
        return None if tap is None else self.relu_handler(tap, x)


_current: ContextVar[_Pass | None] = ContextVar("meansparse_pass", default=None)


class _FunctionCalls(TorchFunctionMode):
    """Routes the input of every functional activation call, and additions made in tapped modules."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        state = _current.get()
        if state is None or not state.functional:  # a pass nested in this one that needs no function mode
            return func(*args, **kwargs)
        scope = state.scopes[-1][1] if state.scopes else None
        if func in ADDITIONS and scope is not None and scope in state.sum_scopes:
            result = func(*args, **kwargs)
            return state.route(state.call_name(f"{scope}:add"), "sum", result) if isinstance(result, torch.Tensor) else result
        op = ACTIVATION_FUNCTIONS.get(func)
        if scope is not None and scope in state.module_taps:
            op = None  # the call inside an activation module whose pre-hook has already routed its input
        if op is not None and args and isinstance(args[0], torch.Tensor):
            name = state.call_name(state.router.function_tap_base(state, op))
            if op == "relu" and (output := state.route_relu(name, args[0])) is not None:
                return output  # a new tensor, as routing the input gives the activation a new tensor
            args = (state.route(name, "function", args[0]), *args[1:])
        return func(*args, **kwargs)


def _routed_relu(module: nn.ReLU, x: torch.Tensor) -> torch.Tensor:
    """``nn.ReLU.forward`` while a router is installed: a tapped call is routed here, and where the pass
    can, the operator and the ReLU run as one kernel (``_Pass.route_relu``) instead of the model's ReLU.

    Catching the call here rather than in the function mode keeps that mode, and its Python call for
    every torch function of the forward pass, out of models whose taps are all activation modules.
    Outside a pass, and at untapped modules, it is ``nn.ReLU.forward``.
    """
    state = _current.get()
    if state is not None and state.taps is not None and (base := state.router.names.get(module)) in state.module_taps:
        name = state.call_name(base)
        if (output := state.route_relu(name, x)) is not None:
            return output
        x = state.route(name, "module", x)
    return F.relu(x, inplace=module.inplace)


def _routes_itself(module: nn.Module) -> bool:
    """True for a module whose forward is ``_routed_relu``: its pre-hook leaves the routing to it."""
    return getattr(vars(module).get("forward"), "__func__", None) is _routed_relu


# nn.ReLU modules whose forward is ``_routed_relu``, with how many routers use each (guarded by
# ``_routers_lock``): a ReLU shared by two routed models keeps it until both are done.
_routed_relus: dict[nn.Module, int] = {}


def _use_routed_relu(module: nn.Module) -> None:
    if module not in _routed_relus and "forward" in vars(module):
        return  # a forward of someone else's: left alone, and the module's pre-hook routes its input
    _routed_relus[module] = _routed_relus.get(module, 0) + 1
    if _routed_relus[module] == 1:
        module.forward = MethodType(_routed_relu, module)


def _release_routed_relu(module: nn.Module) -> None:
    if module in _routed_relus:
        _routed_relus[module] -= 1
        if _routed_relus[module] == 0:
            del _routed_relus[module]
            del module.forward


class _Router:
    """The routing of one model: ``_routed_relu`` as the forward of its ``nn.ReLU`` modules, and hooks
    on the modules its users' passes need (``hold``); inert unless a pass is active in this context.

    The forward is set on each ReLU instance, as hooks are: another caller of the model, with no
    pass of its own, runs the ReLU as PyTorch does, and ``remove`` restores the class's forward.
    Hooks sit only where a pass needs them: every hooked module's call takes PyTorch's slower path.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = {m: n for n, m in model.named_modules()}
        self.activation_modules = {m for m in self.names if _is_activation_module(m)}
        # PyTorch's own activation modules apply their function to their input and nothing else, so
        # a pre-hook catches them as well as the function mode does, without its cost per operation.
        self.torch_activations = {self.names[m] for m in self.activation_modules
                                  if type(m).__module__ == nn.ReLU.__module__}
        self.robustbench_layers = {m for m in self.names if is_robustbench_meansparse(m)}
        self.users = 0
        self.relus = [m for m in self.names if type(m) is nn.ReLU]
        for module in self.relus:
            _use_routed_relu(module)
        self.hooks: dict[nn.Module, list] = {}  # module: [pre-hook handle, hook handle, holders]

    def remove(self) -> None:
        for pre_hook, hook, _ in self.hooks.values():
            pre_hook.remove()
            hook.remove()
        for module in self.relus:
            _release_routed_relu(module)

    def needs_hooks(self, taps: list[Tap] | None) -> list[nn.Module]:
        """The modules whose hooks a pass over ``taps`` needs (None: discovery): every module where the
        function mode runs, which names a call by the module it is made in; else the tapped modules
        that do not route themselves."""
        if taps is None or any(t.kind in _FUNCTION_MODE_KINDS for t in self.cheapest(taps)):
            return list(self.names)
        by_name = {name: module for module, name in self.names.items()}
        tapped = dict.fromkeys(by_name[_module_part(t.name)] for t in taps)
        return [module for module in tapped if not _routes_itself(module)]

    def hold(self, modules: list[nn.Module]) -> Callable[[], None]:
        """Hooks on ``modules`` until the returned function is called; shared, the last holder removes them."""
        with _routers_lock:
            for module in modules:
                held = self.hooks.get(module)
                if held is None:
                    held = self.hooks[module] = [module.register_forward_pre_hook(self._enter),
                                                 module.register_forward_hook(self._leave), 0]
                held[2] += 1

        def release() -> None:
            with _routers_lock:
                for module in modules:
                    held = self.hooks[module]
                    held[2] -= 1
                    if held[2] == 0:
                        held[0].remove()
                        held[1].remove()
                        del self.hooks[module]
        return release

    def cheapest(self, taps: list[Tap]) -> list[Tap]:
        """``taps`` with functional calls inside PyTorch's activation modules caught by the modules
        themselves (pre-hooks; ``_routed_relu`` for ``nn.ReLU``), so a pass of them needs no function mode."""
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
        if state.functional:
            state.scopes.append((module, name))
            if state.taps is None:
                state.found_at_entry.append(len(state.found))
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        if name in state.inputs:
            x = state.route(state.call_name(f"{name}:input"), "input", x)
        if state.taps is not None and name in state.module_taps and not _routes_itself(module):
            x = state.route(state.call_name(name), "module", x)
        return None if x is args[0] else (x, *args[1:])

    def _leave(self, module: nn.Module, args: tuple, output):
        state = _current.get()
        if state is None:
            return None
        if state.functional:
            state.scopes.pop()
        name = self.names[module]
        if state.taps is None:
            self._discover_after(state, module, args)
        elif module in self.robustbench_layers:
            return state.route(state.call_name(name), "robustbench", args[0])
        if name in state.outputs and isinstance(output, torch.Tensor):
            routed = state.route(state.call_name(f"{name}:output"), "output", output)
            return None if routed is output else routed
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
# Reentrant: a SparseModel keeps its model's routing entered, and when the cyclic garbage collector
# frees one, the routing's exit runs in whatever this thread was doing, possibly inside this very lock
# (building another router allocates); a plain Lock then waits on itself forever.
_routers_lock = threading.RLock()


@contextmanager
def _routing(model: nn.Module, taps: list[Tap] | None) -> Iterator[_Router]:
    """Install the model's router for the duration of the block (shared by nested users), with the
    hooks that passes over ``taps`` need (None: discovery)."""
    with _routers_lock:
        router = _routers.get(model) or _routers.setdefault(model, _Router(model))
        router.users += 1
        release = router.hold(router.needs_hooks(taps))
    try:
        yield router
    finally:
        with _routers_lock:
            release()
            router.users -= 1
            if router.users == 0:
                router.remove()
                # pop, not del: when a SparseModel is garbage-collected its model may be gone already.
                _routers.pop(model, None)


def _run(state: _Pass, model: nn.Module, args: tuple, kwargs: dict):
    token = _current.set(state)
    try:
        with _FunctionCalls() if state.functional else nullcontext():
            return model(*args, **kwargs)
    finally:
        _current.reset(token)


def own_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The RobustBench MeanSparse layers a model carries (``Amini2024MeanSparse_*``), by name."""
    return {name: m for name, m in model.named_modules() if is_robustbench_meansparse(m)}


def placement_of(model: nn.Module, placement: "str | Placement" = "activations") -> Placement:
    """The placement ``find_taps`` applies to ``model``: its own MeanSparse layers if it has any.

    A model that carries the authors' layers is tapped at exactly those layers (they are its released
    placement), under ``activations`` and ``released`` alike; a rule of one's own is refused there.
    """
    if own_layers(model):
        if isinstance(placement, str) and placement in ("activations", "released") or placement == OWN_LAYERS:
            return OWN_LAYERS
        raise ValueError(f"{type(model).__name__} carries its own MeanSparse layers, which are its taps; apply a rule "
                         "of your own to a model without them (e.g. its base model).")
    return resolve(placement, model)


def _unmatched_rule(placement: Placement, taps: list[Tap]) -> str | None:
    """The first rule of ``placement`` that put no tap anywhere, as text."""
    suffix = {"input": ":input", "output": ":output", "additions": ":add"}
    for rule in placement.rules:
        if not any(t.name.split("#")[0] == f"{_module_part(t.name)}{suffix[rule.where]}"
                   and name_matches(rule.pattern, _module_part(t.name)) for t in taps):
            return f"{rule.pattern}:{rule.where}"
    return None


@torch.no_grad()
def find_taps(model: nn.Module, example: torch.Tensor, placement: "str | Placement" = "activations") -> list[Tap]:
    """List the taps of ``model`` in forward order, from one forward pass on ``example`` (eval mode).

    ``placement`` is a name from ``placement_rules.PLACEMENTS`` ("activations", "released"), a rule's
    text (e.g. ``"layer.*.block.*:output"``) or a ``Placement``; see ``placement_of``.
    """
    placement = placement_of(model, placement)
    with eval_mode(model), _routing(model, None) as router:
        state = _Pass(router, handler=None, taps=None, placement=placement)
        _run(state, model, (example,), {})
    if placement == OWN_LAYERS:
        return [t for t in state.found if t.kind == "robustbench"]
    taps = [t for t in state.found if t.kind in ("input", "output", "sum")
            or placement.activations and not placement.skips(_module_part(t.name))]
    if (rule := _unmatched_rule(placement, taps)) is not None:
        example_names = ", ".join(list(router.names.values())[1:4])
        raise ValueError(f"The rule {rule!r} matches no module of {type(model).__name__} (its modules are named like "
                         f"{example_names}); check the pattern.")
    if not taps:
        raise ValueError(
            f"No activation found in {type(model).__name__}: MeanSparse sits in front of "
            "activations such as ReLU, SiLU or GELU."
        )
    return taps


def route_taps(model: nn.Module, taps: list[Tap], handler: Handler, *args, **kwargs):
    """Run ``model(*args, **kwargs)`` once with each tap's features replaced by ``handler(tap, x)``."""
    with _routing(model, taps) as router:
        state = _Pass(router, handler, {t.name: t for t in router.cheapest(taps)})
        return _run(state, model, args, kwargs)


class SparseModel(nn.Module):
    """A model with MeanSparse at the taps of its statistics; alpha is chosen per call.

    The wrapped model's weights are shared, not copied, and never modified; ``detach()`` removes
    every hook. Example::

        sparse = attach(model, stats)
        logits = sparse(x, alpha=0.25)
        attackable = sparse.at(alpha=0.25, grad="straight-through")   # an nn.Module for attacks
        plain = sparse.base   # the base model: alpha 0, the model's own MeanSparse layers switched off
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
        self._attachment = _routing(model, self.taps)
        self._router = self._attachment.__enter__()
        self._by_name = {t.name: t for t in self._router.cheapest(self.taps)}  # built once: forward runs on every slider move
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

        def relu_handler(tap: Tap, features: torch.Tensor) -> torch.Tensor | None:
            tap_alpha = layer_alphas.get(tap.name, alpha)
            # At alpha 0 the model's own call runs untouched (in place, if it says so); where the
            # kernel cannot run (a GPU), the operator and the ReLU run apart, each at its best.
            if not native.usable(features, tap.channel_dim) or not tap_alpha:
                return None
            return self.operators[self._index[tap.name]].relu(features, tap_alpha, grad)

        return _run(_Pass(self._router, handler, self._by_name, relu_handler=relu_handler), self.model, (x,), {})

    def at(self, alpha: float, grad: GradMode = "exact", layer_alphas: Mapping[str, float] | None = None) -> "FixedAlpha":
        """A light ``nn.Module`` view with these settings frozen, e.g. for torchattacks."""
        return FixedAlpha(self, alpha, grad, layer_alphas)

    @property
    def base(self) -> nn.Module:
        """The base model: the plain model, or, when it carries its own MeanSparse layers, the model
        with those layers switched off (called directly, they would run at their stored threshold)."""
        return self.at(0.0) if any(t.kind == "robustbench" for t in self.taps) else self.model

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


def _example(model: nn.Module, stats: "Statistics") -> torch.Tensor:
    return torch.zeros(1, *stats.input_size, device=next(model.parameters()).device)


def _onto(model: nn.Module, stats: "Statistics") -> "Statistics":
    """``stats`` for ``model``'s taps: a released model's layers mapped onto its base model's
    ``released`` taps (in forward order, channel counts checked), other statistics checked as they are."""
    if stats.input_size is None:
        return stats  # written before files recorded the input size: nothing to run the check on
    released_layers = stats.taps and all(t.tap.kind == "robustbench" for t in stats.taps)
    if released_layers and not own_layers(model):
        taps = find_taps(model, _example(model, stats), "released")
        if [t.channels for t in taps] != [t.tap.channels for t in stats.taps]:
            raise ValueError(
                f"These statistics come from {len(stats.taps)} MeanSparse layers, but the released placement of "
                f"{type(model).__name__} has {len(taps)} taps with other widths; is this model their base model?")
        return replace(stats, taps=[replace(s, tap=t) for s, t in zip(stats.taps, taps)],
                       placement=placement_of(model, "released"))
    taps = find_taps(model, _example(model, stats), stats.placement)
    if taps != stats.tap_list:
        raise ValueError(f"These statistics were computed at other places than the {stats.placement.label} placement "
                         f"puts in {type(model).__name__} ({len(stats.taps)} taps, here {len(taps)}); recalibrate "
                         "for this model.")
    return stats


def attach(model: nn.Module, stats: "Statistics", placement: "str | Placement | None" = None) -> SparseModel:
    """Put MeanSparse with ``stats`` at the taps of ``model`` that the statistics were computed for.

    Statistics read from a released model (``embedded_statistics``) attach to its base model too: the
    library maps the released layers onto the base's ``released`` taps. ``placement``, when given,
    must be the one the statistics were computed with. Anything that does not fit raises ValueError
    before a hook is installed.
    """
    if placement is not None and placement_of(model, placement) != stats.placement and not (
            stats.placement == OWN_LAYERS and placement_of(model, placement).name == "released"):
        raise ValueError(f"These statistics were computed with the {stats.placement.label} placement, not "
                         f"{placement_of(model, placement).label}; calibrate with that placement or pick "
                         f"{stats.placement.name}.")
    return SparseModel(model, _onto(model, stats))
