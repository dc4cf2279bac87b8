"""Run a block with a shared model in eval mode or with frozen weights, and give each flag back after.

Sessions share cached models, so two such blocks on two threads can overlap: the flags are
reference-counted per object, so that the last block out, not the first, restores them.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from torch import nn

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
