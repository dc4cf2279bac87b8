"""Nothing of a sparsified model stays on the user's model between passes: it can be saved, loaded,
copied and called on its own while a SparseModel lives, and a detached SparseModel says so."""

from __future__ import annotations

import copy
import gc
import io
import threading

import pytest
import torch
from torch import nn

from meansparse_core import attach
from meansparse_core.models import bundled_statistics_path, find_model, load_model
from meansparse_core.statistics import Statistics, embedded_statistics

SPEC = find_model("bundled/digits-cnn")
IMAGES = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def digits_with_stats() -> tuple[nn.Module, Statistics]:
    return load_model(SPEC), Statistics.load(bundled_statistics_path(SPEC))


def carries_nothing(model: nn.Module) -> bool:
    """No forward on an instance, no module hook, only PyTorch's own classes for the ReLUs."""
    return all("forward" not in vars(m) and not m._forward_pre_hooks and not m._forward_hooks
               and (type(m) is nn.ReLU or not isinstance(m, nn.ReLU)) for m in model.modules())


@pytest.fixture(params=["relu modules", "own MeanSparse layers"])
def live(request, released_digits):
    """A model and a SparseModel over it that stays alive for the whole test."""
    if request.param == "relu modules":
        model, stats = digits_with_stats()
    else:
        model = released_digits(0.25)
        stats = embedded_statistics(model, IMAGES[:1])
    sparse = attach(model, stats)
    with torch.no_grad():
        sparse(IMAGES, alpha=0.5)  # a pass has run
    return model, sparse


@torch.no_grad()
def test_the_model_saves_and_loads_while_a_sparse_model_lives(live):
    model, sparse = live
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert carries_nothing(loaded) and torch.equal(loaded(IMAGES), model(IMAGES))
    assert torch.equal(sparse(IMAGES, alpha=0.5), sparse(IMAGES, alpha=0.5))


@torch.no_grad()
def test_a_copy_of_the_model_carries_no_routing(live):
    model, sparse = live
    copied = copy.deepcopy(model)
    assert carries_nothing(copied) and carries_nothing(model)
    assert torch.equal(copied(IMAGES), model(IMAGES))


@torch.no_grad()
def test_a_detached_sparse_model_refuses_to_run_instead_of_giving_base_logits():
    model, stats = digits_with_stats()
    sparse = attach(model, stats)
    assert sparse.detach() is model and carries_nothing(model)
    with pytest.raises(RuntimeError, match="detached"):
        sparse(IMAGES, alpha=0.5)
    with attach(model, stats) as scoped:
        assert not torch.equal(scoped(IMAGES, alpha=1.0), model(IMAGES))
    with pytest.raises(RuntimeError, match="detached"):
        scoped(IMAGES, alpha=1.0)


def test_attach_and_detach_from_several_threads_never_leave_a_tap_unrouted():
    """Sparse models made, used, dropped (some only to the cyclic collector) and detached at once on one
    shared model: every pass is sparsified, and the model carries nothing afterwards."""
    model, stats = digits_with_stats()
    with torch.no_grad():
        expected, base = attach(model, stats)(IMAGES, alpha=1.0), model(IMAGES)
    assert not torch.equal(expected, base)
    wrong, errors = [], []
    threshold = gc.get_threshold()
    gc.set_threshold(50)  # the collector runs often, in the middle of other threads' set-ups

    def work(seed: int) -> None:
        try:
            for i in range(15):
                sparse = attach(model, stats)
                with torch.no_grad():
                    if not torch.equal(sparse(IMAGES, alpha=1.0), expected):
                        wrong.append((seed, i))
                if i % 3 == 0:
                    sparse.detach()
                else:
                    sparse.cycle = [sparse]  # freed by the cyclic collector only
                del sparse
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        gc.set_threshold(*threshold)
    gc.collect()
    assert not errors and not wrong, (errors, wrong)
    assert carries_nothing(model)
    with torch.no_grad():
        assert torch.equal(model(IMAGES), base)
