"""Routing: run a forward pass with each tap's features sent through a handler (the operator, a probe).

Taps (``taps.py``) are caught three ways: functional activations and additions with a
``TorchFunctionMode``; activation modules, modules' inputs and outputs and RobustBench's MeanSparse
layers with module hooks; and tapped ``nn.ReLU`` modules by their own forward (``_routed_relu``),
which can run the operator and the ReLU as one kernel.

What a pass installs (the hooks, the ReLUs' forward) lives only as long as the pass, shared with
the passes running at the same time: a model saved, copied or called on its own between passes
carries nothing of it. The hooks read the pass from a ``ContextVar``, so one model can serve several
threads with different handlers at once.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import replace
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from .placement_rules import ACTIVATIONS, Placement, name_matches
from .taps import (ACTIVATION_FUNCTIONS, ADDITIONS, Tap, TapKind, channel_dim, channel_width, is_activation_module,
                   is_robustbench_meansparse, module_part)

Handler = Callable[[Tap, torch.Tensor], torch.Tensor]
# A tapped ReLU's output in one call (operator and activation fused), or None to run them apart.
ReluHandler = Callable[[Tap, torch.Tensor], "torch.Tensor | None"]

# Taps caught by the function mode; a pass without them runs without its per-operation cost.
_FUNCTION_MODE_KINDS = {"function", "sum"}


class Pass:
    """State of one forward pass: which taps to route and to whom, and where the pass is.

    While discovering (``taps`` is None), ``placement`` says which modules' inputs, outputs and
    additions are taps; otherwise the tap names say it.
    """

    def __init__(self, router: "Router", handler: Handler | None, taps: Mapping[str, Tap] | None,
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
            self.own_layers: set[str] = set()
        else:
            by_kind: dict[str, set[str]] = {}
            for t in taps.values():
                by_kind.setdefault(t.kind, set()).add(module_part(t.name))
            # Activation modules caught by a pre-hook (no functional activation inside them).
            self.module_taps = by_kind.get("module", set())
            self.inputs, self.outputs = by_kind.get("input", set()), by_kind.get("output", set())
            self.sum_scopes = by_kind.get("sum", set())
            self.own_layers = by_kind.get("robustbench", set())
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
            axis = channel_dim(x, self.width_hint)
            self.found.append(Tap(name, kind, axis, x.shape[axis]))
            return x
        tap = self.taps.get(name)
        return x if tap is None else self.handler(tap, x)

    def route_relu(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The output of a tapped ReLU, operator included, from the ReLU handler; None: route the input."""
        tap = self.taps.get(name) if self.taps is not None and self.relu_handler is not None else None
        return None if tap is None else self.relu_handler(tap, x)



_current: ContextVar[Pass | None] = ContextVar("meansparse_pass", default=None)


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
    """``forward`` of a tapped ``nn.ReLU`` during a pass: the call is routed here, and where the pass
    can, the operator and the ReLU run as one kernel (``Pass.route_relu``) instead of the model's ReLU.

    Catching the call here rather than in the function mode keeps that mode, and its Python call for
    every torch function of the forward pass, out of models whose taps are all activation modules.
    Outside a pass, and at modules the pass does not tap, it is ``nn.ReLU.forward``.
    """
    state = _current.get()
    if state is not None and state.taps is not None and (base := state.router.names.get(module)) in state.module_taps:
        name = state.call_name(base)
        if (output := state.route_relu(name, x)) is not None:
            return output
        x = state.route(name, "module", x)
    return F.relu(x, inplace=module.inplace)


class _RoutedReLU(nn.ReLU):
    """The class of a tapped ``nn.ReLU`` while a pass runs, and only then (``_installed``).

    A class rather than a forward set on the instance: a model saved or copied in the middle of a
    pass holds a class that can be imported, and behaves as ``nn.ReLU`` outside passes.
    """

    forward = _routed_relu

    def _get_name(self) -> str:
        return "ReLU"


def _routes_itself(module: nn.Module) -> bool:
    """True for an ``nn.ReLU`` whose calls ``_routed_relu`` can catch: no forward of someone else's on it."""
    return type(module) in (nn.ReLU, _RoutedReLU) and "forward" not in vars(module)


# What passes running now have installed, shared between them: the ReLUs turned into ``_RoutedReLU``
# with how many passes use each, and how many passes use the global hooks. The model carries none of
# it once its last pass ends. Nothing here runs from a finalizer, so a plain lock cannot deadlock.
_installs_lock = threading.Lock()
_routed_relus: dict[nn.Module, int] = {}
_hook_users: list = [0, None]  # [passes, (pre-hook handle, hook handle)]


def _enter_any(module: nn.Module, args: tuple):
    state = _current.get()
    if state is None or module not in state.router.names:  # another model's module: not this pass's
        return None
    return state.router.enter(state, module, args)


def _leave_any(module: nn.Module, args: tuple, output):
    state = _current.get()
    if state is None or module not in state.router.names:
        return None
    return state.router.leave(state, module, args, output)


@contextmanager
def _installed(relus: list[nn.Module], hooks: bool) -> Iterator[None]:
    """``relus`` routed by ``_routed_relu``, and with ``hooks`` the global module hooks, for one pass."""
    with _installs_lock:
        for module in relus:
            _routed_relus[module] = _routed_relus.get(module, 0) + 1
            module.__class__ = _RoutedReLU
        if hooks:
            _hook_users[0] += 1
            if _hook_users[0] == 1:
                _hook_users[1] = (register_module_forward_pre_hook(_enter_any), register_module_forward_hook(_leave_any))
    try:
        yield
    finally:
        with _installs_lock:
            for module in relus:
                _routed_relus[module] -= 1
                if _routed_relus[module] == 0:
                    del _routed_relus[module]
                    module.__class__ = nn.ReLU
            if hooks:
                _hook_users[0] -= 1
                if _hook_users[0] == 0:
                    for handle in _hook_users[1]:
                        handle.remove()
                    _hook_users[1] = None


class Router:
    """How passes over one model catch its taps: its modules by name, which are activations and which
    are RobustBench MeanSparse layers. Holds nothing on the model: each pass installs what it needs
    (``run_pass``) and removes it when it ends.

    Module hooks are global ones (``register_module_forward_pre_hook``), installed only while a pass
    that needs them runs: they act for the pass running in their context, at its model's modules.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = {m: n for n, m in model.named_modules()}
        self.by_name = {n: m for m, n in self.names.items()}
        self.activation_modules = {m for m in self.names if is_activation_module(m)}
        # PyTorch's own activation modules apply their function to their input and nothing else, so
        # a pre-hook catches them as well as the function mode does, without its cost per operation.
        self.torch_activations = {self.names[m] for m in self.activation_modules
                                  if type(m).__module__ == nn.ReLU.__module__}
        self.robustbench_layers = {m for m in self.names if is_robustbench_meansparse(m)}

    def installs(self, state: Pass) -> tuple[list[nn.Module], bool]:
        """What a pass needs while it runs: the tapped ReLUs that route themselves, and whether it
        needs the module hooks (discovery, the function mode, inputs, outputs, other taps)."""
        if state.taps is None:
            return [], True
        relus = [m for m in (self.by_name[n] for n in state.module_taps) if _routes_itself(m)]
        hooks = (state.functional or bool(state.inputs or state.outputs or state.own_layers)
                 or len(relus) < len(state.module_taps))
        return relus, hooks

    def cheapest(self, taps: list[Tap]) -> list[Tap]:
        """``taps`` with functional calls inside PyTorch's activation modules caught by the modules
        themselves (pre-hooks; ``_routed_relu`` for ``nn.ReLU``), so a pass of them needs no function mode."""
        return [replace(t, kind="module") if t.kind == "function" and t.name.split("#")[0] in self.torch_activations
                else t for t in taps]

    def function_tap_base(self, state: Pass, op: str) -> str:
        module, name = state.scopes[-1] if state.scopes else (None, "")
        if module in self.activation_modules:
            return name
        return f"{name}:{op}" if name else op

    def enter(self, state: Pass, module: nn.Module, args: tuple):
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
        if state.taps is not None and name in state.module_taps and not (type(module) is _RoutedReLU and _routes_itself(module)):
            x = state.route(state.call_name(name), "module", x)
        return None if x is args[0] else (x, *args[1:])

    def leave(self, state: Pass, module: nn.Module, args: tuple, output):
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

    def _discover_after(self, state: Pass, module: nn.Module, args: tuple) -> None:
        found_inside = len(state.found) - state.found_at_entry.pop()
        name = self.names[module]
        if module in self.robustbench_layers:
            state.route(state.call_name(name), "robustbench", args[0])
        elif module in self.activation_modules and found_inside == 0 and args:
            state.route(state.call_name(name), "module", args[0])
        if (hint := channel_width(module)) is not None:
            state.width_hint = hint


def run_pass(state: Pass, model: nn.Module, args: tuple, kwargs: dict):
    """``model(*args, **kwargs)`` as one pass: its taps routed as ``state`` says, nothing left after."""
    relus, hooks = state.router.installs(state)
    token = _current.set(state)
    try:
        with _installed(relus, hooks), _FunctionCalls() if state.functional else nullcontext():
            return model(*args, **kwargs)
    finally:
        _current.reset(token)


def route_taps(model: nn.Module, taps: list[Tap], handler: Handler, *args, **kwargs):
    """Run ``model(*args, **kwargs)`` once with each tap's features replaced by ``handler(tap, x)``."""
    router = Router(model)
    return run_pass(Pass(router, handler, {t.name: t for t in router.cheapest(taps)}), model, args, kwargs)


def discover(model: nn.Module, example: torch.Tensor, placement: Placement) -> tuple[list[Tap], list[str]]:
    """Every tap one pass on ``example`` meets, activations and the places ``placement``'s rules name
    alike, in forward order; and the model's module names."""
    router = Router(model)
    state = Pass(router, handler=None, taps=None, placement=placement)
    run_pass(state, model, (example,), {})
    return state.found, list(router.names.values())
