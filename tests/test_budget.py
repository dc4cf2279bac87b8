"""What an attack will cost, said before it runs: the estimate against the time the attack takes here.

Each case runs an attack on an image it never fools (eps 0.25/255), so the attack makes every pass it can
and the estimate (the most it can take) is the time it should take. The bound is wide on purpose: this
checks the estimator's pass counts and bookkeeping, not the machine's speed.
"""

import time

import pytest
import torch

from meansparse_core.attacks import make_attack
from meansparse_core.budget import measure
from meansparse_core.data import load_dataset, load_items
from meansparse_core.models import find_model, load_model


@pytest.fixture(scope="module")
def digits():
    spec = find_model("bundled/digits-cnn")
    images, labels = load_items(load_dataset("digits", "test"), range(1))
    return load_model(spec), spec.input_size, images, labels


@pytest.fixture
def one_thread():
    """Both the timing and the attack on one torch thread, as a job runs on a small machine (with two threads
    for these tiny passes a busy machine makes every pass wait for a second core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("attack, steps", [("square", 1000), ("apgd-ce", 100), ("pgd", 50), ("autoattack", 1)])
def test_the_estimate_is_within_2x_of_the_time_an_attack_takes(digits, one_thread, attack, steps):
    model, input_size, images, labels = digits
    cost = measure(model, input_size)
    run = make_attack(attack, model, eps=0.25, steps=steps)
    start = time.perf_counter()
    adversarial = run(images, labels)
    took = time.perf_counter() - start
    assert torch.equal(model(adversarial).argmax(1), labels), "the case must fool nothing, else the attack stops early"
    ratio = cost.seconds(attack, steps) / took
    assert 0.5 <= ratio <= 2, f"{attack}: estimated {cost.seconds(attack, steps):.2f} s, took {took:.2f} s"
