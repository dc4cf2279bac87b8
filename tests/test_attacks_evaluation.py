"""Attacks and evaluation on a small trained classifier, with and without MeanSparse."""

import json

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from meansparse_core import attach, calibrate
from meansparse_core.attacks import ATTACKS, make_attack
from meansparse_core.data import load_dataset, load_items
from meansparse_core.evaluation import EvalSettings, ResultCache, evaluate, predict, sweep
from meansparse_core.files import CacheWarning


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 16, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc2(F.silu(self.fc1(h.flatten(1))))


@pytest.fixture(scope="module")
def digits_model():
    """A digits classifier trained in a few seconds (clean training: these tests need a real model,
    not a robust one), calibrated, with 120 test items."""
    torch.manual_seed(0)
    train = load_dataset("digits", "train")
    x, y = load_items(train, range(len(train)))
    model = SmallNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        for batch in torch.randperm(len(y)).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    test_images, test_labels = load_items(load_dataset("digits", "test"), range(120))
    stats = calibrate(model, x.split(256))
    return model, stats, test_images, test_labels


def test_the_fixture_model_is_accurate(digits_model):
    model, _, images, labels = digits_model
    assert (predict(model, images) == labels).float().mean() > 0.9


@pytest.mark.parametrize("name", sorted(set(ATTACKS) - {"autoattack"}))
def test_every_attack_stays_in_budget_and_in_range(digits_model, name):
    model, _, images, labels = digits_model
    eps = 1.0 if name == "pgd-l2" else 32
    attack = make_attack(name, model, eps=eps, steps=100 if name == "square" else 10, seed=0)
    adversarial = attack(images[:20], labels[:20])
    delta = (adversarial - images[:20]).flatten(1)
    bound = delta.norm(dim=1).max() if name == "pgd-l2" else delta.abs().max() * 255
    assert bound <= eps * (1 + 1e-4) and adversarial.min() >= 0 and adversarial.max() <= 1
    assert (predict(model, adversarial) != labels[:20]).any(), f"{name} fooled nothing"


def test_attacks_leave_the_model_untouched(digits_model):
    model, _, images, labels = digits_model
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make_attack("pgd", model, eps=8, steps=3)(images[:8], labels[:8])
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()


def test_autoattack_standard_runs(digits_model):
    model, _, images, labels = digits_model
    adversarial = make_attack("autoattack", model, eps=64, seed=0)(images[:6], labels[:6])
    assert (adversarial - images[:6]).abs().max() <= 64 / 255 + 1e-6
    with pytest.raises(ValueError, match="untargeted"):
        make_attack("autoattack", model, eps=8, targeted=True)(images[:2], labels[:2])


def test_targeted_pgd_reaches_its_targets(digits_model):
    model, _, images, labels = digits_model
    attack = make_attack("pgd", model, eps=64, steps=40, targeted=True, seed=1)
    targets = attack._random_targets(images[:20], labels[:20])
    assert (targets != labels[:20]).all()
    hits = (predict(model, attack(images[:20], labels[:20])) == targets).float().mean()
    assert hits > 0.5


def test_square_needs_no_gradients(digits_model):
    model, _, images, labels = digits_model

    class NoGradients(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x).detach()  # any gradient-based attack fails on this

    opaque = NoGradients()
    with pytest.raises(RuntimeError):
        make_attack("pgd", opaque, eps=8, steps=1)(images[:4], labels[:4])
    adversarial = make_attack("square", opaque, eps=48, steps=300, seed=0)(images[:20], labels[:20])
    assert (predict(model, adversarial) != labels[:20]).any()


def test_pgd_at_eps_zero_leaves_accuracy_unchanged(digits_model):
    model, _, images, labels = digits_model
    result = evaluate(model, images, labels, EvalSettings(attack="pgd", eps=0, steps=5))
    assert result.robust_acc == result.clean_acc > 0.9


def test_larger_eps_never_raises_robust_accuracy(digits_model):
    model, stats, images, labels = digits_model
    sparse = attach(model, stats)
    for target in [model, sparse]:
        accs = [evaluate(target, images, labels, EvalSettings(alpha=0.2, attack="pgd", eps=eps, steps=10)).robust_acc
                for eps in [0, 4, 8, 16, 32]]
        assert accs == sorted(accs, reverse=True) and accs[0] > accs[-1]


def test_sweep_at_alpha_zero_equals_the_base_model(digits_model):
    model, stats, images, labels = digits_model
    sparse = attach(model, stats)
    settings = EvalSettings(attack="fgsm", eps=8)
    table = sweep(sparse, images, labels, settings, alphas=[0.0, 0.5, 2.0])
    base = evaluate(model, images, labels, settings)
    assert (table[0].clean_acc, table[0].robust_acc) == (base.clean_acc, base.robust_acc)
    assert [r.settings.alpha for r in table] == [0.0, 0.5, 2.0]
    assert table[2].clean_acc < table[0].clean_acc, "replacing everything within 2 sigma must cost accuracy"


def test_sweep_progress_moves_within_each_alpha_and_ends_at_the_number_of_alphas(digits_model):
    model, stats, images, labels = digits_model
    reports = []
    sweep(attach(model, stats), images, labels, EvalSettings(attack="fgsm", eps=8, batch_size=40), alphas=[0.0, 0.3],
          progress=lambda done, total: reports.append((done, total)))
    done = [d for d, _ in reports]
    assert {t for _, t in reports} == {2} and done == sorted(done) and done[-1] == 2
    assert any(0 < d < 1 for d in done) and any(1 < d < 2 for d in done), "no report inside an alpha"


def test_bpda_gradients_are_non_zero_where_exact_ones_vanish(digits_model):
    model, stats, images, labels = digits_model
    sparse = attach(model, stats)
    grads = {}
    for mode in ["exact", "straight-through"]:
        x = images[:16].clone().requires_grad_(True)
        F.cross_entropy(sparse(x, alpha=100.0, grad=mode), labels[:16]).backward()
        grads[mode] = x.grad
    assert torch.count_nonzero(grads["exact"]) == 0
    assert torch.count_nonzero(grads["straight-through"]) > 0


def attacked_batches(monkeypatch) -> list[int]:
    """The sizes of the batches that evaluations attack from now on."""
    import meansparse_core.evaluation as evaluation

    real, seen = evaluation.make_attack, []

    def spy(*args, **kwargs):
        attack = real(*args, **kwargs)
        inner = attack.__call__
        attack.__class__ = type("Spy", (attack.__class__,), {"__call__": lambda self, x, y: seen.append(len(x)) or inner(x, y)})
        return attack

    monkeypatch.setattr(evaluation, "make_attack", spy)
    return seen


def test_evaluation_reports_progress_within_each_batch(digits_model):
    """A batch of a long attack takes minutes on a CPU: its progress moves at every pass through the model."""
    model, _, images, labels = digits_model
    reports = []
    evaluate(model, images[:40], labels[:40], EvalSettings(attack="pgd", eps=8, steps=4, batch_size=40),
             lambda done, total: reports.append(done))
    assert 0 < min(r for r in reports if r) < reports[-1] and reports == sorted(reports)


def test_robust_accuracy_attacks_only_correct_items(digits_model, monkeypatch):
    model, _, images, labels = digits_model
    wrong = labels.clone()
    wrong[:30] = (wrong[:30] + 1) % 10  # 30 items the model now gets wrong
    seen = attacked_batches(monkeypatch)
    result = evaluate(model, images, wrong, EvalSettings(attack="fgsm", eps=8))
    assert sum(seen) == round(result.clean_acc * len(labels)) <= len(labels) - 30


class Interrupted(Exception):
    pass


def test_an_interrupted_evaluation_resumes_where_it_stopped_with_the_same_result(digits_model, tmp_path, monkeypatch):
    model, stats, images, labels = digits_model
    sparse = attach(model, stats)
    settings = EvalSettings(alpha=0.2, attack="pgd", eps=24, steps=5, batch_size=16)  # random start: seeds matter
    whole = evaluate(sparse, images, labels, settings)
    cache, seen = ResultCache(tmp_path), attacked_batches(monkeypatch)

    def stop_after_two_batches(done, total):
        if done >= 32:
            raise Interrupted

    with pytest.raises(Interrupted):
        cache.get_or_run({}, settings, lambda journal: evaluate(sparse, images, labels, settings,
                                                                stop_after_two_batches, journal))
    [journal] = tmp_path.glob("*.journal")
    assert sorted(json.loads(journal.read_text())) == ["0", "16"]

    seen.clear()
    resumed = cache.get_or_run({}, settings, lambda journal: evaluate(sparse, images, labels, settings, journal=journal))
    assert (resumed.clean_acc, resumed.robust_acc) == (whole.clean_acc, whole.robust_acc)
    assert sum(seen) == round(whole.clean_acc * len(labels)) - 32  # the two recorded batches were not attacked again
    assert not list(tmp_path.glob("*.journal")) and len(list(tmp_path.glob("*.json"))) == 1


@pytest.mark.parametrize("content", ["{not json", "[]", '{"0": 5}', '{"0": [-1, 2.0]}', '{"0": [3, NaN]}'])
def test_a_damaged_journal_is_discarded_and_the_evaluation_runs_whole(digits_model, tmp_path, monkeypatch, content):
    model, _, images, labels = digits_model
    settings = EvalSettings(attack="fgsm", eps=8, batch_size=32)
    whole = evaluate(model, images, labels, settings)
    cache, seen = ResultCache(tmp_path), attacked_batches(monkeypatch)

    def stop(done, total):  # once the first batch is recorded (progress is also reported within a batch)
        if done >= settings.batch_size:
            raise Interrupted

    with pytest.raises(Interrupted):
        cache.get_or_run({}, settings, lambda journal: evaluate(model, images, labels, settings, stop, journal))
    [journal] = tmp_path.glob("*.journal")
    journal.write_text(content)
    seen.clear()
    with pytest.warns(CacheWarning, match="journal|impossible"):
        result = cache.get_or_run({}, settings, lambda journal: evaluate(model, images, labels, settings, journal=journal))
    assert result.robust_acc == whole.robust_acc and sum(seen) == round(whole.clean_acc * len(labels))


def test_results_are_cached_by_everything_that_decides_them(digits_model, tmp_path):
    model, _, images, labels = digits_model
    cache = ResultCache(tmp_path)
    runs = []

    def run(settings):
        return lambda journal: runs.append(settings) or evaluate(model, images, labels, settings, journal=journal)

    a, b = EvalSettings(attack="fgsm", eps=8), EvalSettings(attack="fgsm", eps=16)
    first = cache.get_or_run({"model": "m"}, a, run(a))
    again = cache.get_or_run({"model": "m"}, a, run(a))
    cache.get_or_run({"model": "m"}, b, run(b))
    cache.get_or_run({"model": "other"}, a, run(a))
    assert len(runs) == 3 and (again.clean_acc, again.robust_acc) == (first.clean_acc, first.robust_acc)


def test_evaluation_with_no_correct_item_attacks_nothing(digits_model):
    model, _, images, labels = digits_model
    wrong = (predict(model, images[:5]) + 1) % 10
    result = evaluate(model, images[:5], wrong, EvalSettings(attack="pgd", eps=8, steps=2))
    assert (result.clean_acc, result.robust_acc) == (0.0, 0.0)


def test_attacking_a_view_never_switches_the_shared_model_to_training():
    """Regression: a fresh wrapper reports training=True; restoring that must not reach the model."""
    from meansparse_core import Statistics
    from meansparse_core.models import bundled_statistics_path, find_model, load_model

    spec = find_model("bundled/digits-cnn")
    model = load_model(spec)  # has batch norm: train mode would change its outputs and buffers
    sparse = attach(model, Statistics.load(bundled_statistics_path(spec)))
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    images, labels = load_items(load_dataset("digits", "test"), range(60))
    settings = EvalSettings(attack="pgd", eps=32, steps=5)
    alone = sweep(sparse, images, labels, settings, alphas=[0.4])[0]
    after_base = sweep(sparse, images, labels, settings, alphas=[0.0, 0.4])[1]
    assert not model.training and not any(m.training for m in model.modules())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert (alone.clean_acc, alone.robust_acc) == (after_base.clean_acc, after_base.robust_acc)


def test_pgd_step_size_is_in_user_units_and_only_for_pgd(digits_model):
    model, _, images, labels = digits_model
    one_step = make_attack("pgd", model, eps=16, steps=1, step=4, seed=0)
    one_step.random_start = False
    delta = one_step(images[:4], labels[:4]) - images[:4]
    moved = delta[delta != 0].abs()
    assert torch.allclose(moved, torch.full_like(moved, 4 / 255), atol=1e-6)
    with pytest.raises(ValueError, match="own step size"):
        make_attack("apgd-ce", model, eps=8, step=2)
