"""Several users at once: every session gets exactly its own results, and nothing a session does
(attacks included) changes the shared cached model's weights, mode or ``requires_grad``.

Sessions are simulated three ways: threads calling the library on shared models at the same time
(as Streamlit's script threads do), two AppTest sessions of the app, and (in test_browser.py) a
browser per test.
"""

import threading

import pytest
import torch

from meansparse_core.attacks import ATTACKS, make_attack
from meansparse_core.data import load_dataset, load_items
from meansparse_core.models import bundled_statistics_path, find_model, load_model
from meansparse_core.model_modes import eval_mode, frozen
from meansparse_core.sparse_model import attach
from meansparse_core.statistics import Statistics

DIGITS, CIFAR = find_model("bundled/digits-cnn"), find_model("bundled/cifar-resnet9")


def shared(spec):
    model = load_model(spec)
    return model, attach(model, Statistics.load(bundled_statistics_path(spec)))


@pytest.fixture(scope="module")
def models():
    return {"digits": shared(DIGITS), "cifar": shared(CIFAR)}


def images_for(spec, n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, *spec.input_size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def digits_items():
    """Real test images the model gets right, so that every attack (FAB-T in AutoAttack too) really runs."""
    return load_items(load_dataset("digits", "test"), range(4))


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"], "train/eval mode changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad changed"
    assert all(p.grad is None for p in model.parameters()), "gradients were left on the weights"
    assert all(torch.equal(v, before["weights"][k]) for k, v in after["weights"].items()), "weights changed"


def run_together(jobs: list) -> list:
    """Run the jobs in threads that start at the same moment; return their results in order."""
    barrier, results, errors = threading.Barrier(len(jobs)), [None] * len(jobs), []

    def worker(i, job):
        barrier.wait()
        try:
            results[i] = job()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_sessions_with_different_models_images_and_alphas_get_exactly_their_own_results(models):
    sessions = [("digits", 0, 0.0), ("digits", 1, 0.7), ("cifar", 2, 0.3), ("cifar", 3, 1.5), ("digits", 4, 2.0),
                ("cifar", 5, 0.0)]

    def predictions(name, seed, alpha):
        spec, (_, sparse) = (DIGITS if name == "digits" else CIFAR), models[name]
        with torch.no_grad():
            return [sparse(images_for(spec, 4, seed), alpha=alpha) for _ in range(15)]

    alone = [predictions(*s)[0] for s in sessions]
    together = run_together([lambda s=s: predictions(*s) for s in sessions])
    for session, expected, outputs in zip(sessions, alone, together):
        assert all(torch.equal(o, expected) for o in outputs), session


# Every attack against every target; AutoAttack (half a minute here) once, its base case below.
ATTACKED = [(name, target) for name in sorted(set(ATTACKS) - {"autoattack"})
            for target in ("base", "sparse exact", "sparse straight-through")] + [("autoattack", "sparse exact")]


@pytest.mark.parametrize("name, target", ATTACKED)
def test_attacks_leave_the_shared_model_untouched(models, digits_items, name, target):
    model, sparse = models["digits"]
    attacked = model if target == "base" else sparse.at(0.5, target.split()[1])
    before = snapshot(model)
    images, labels = digits_items
    steps = {"square": 20, "autoattack": 1}.get(name, 3)
    make_attack(name, attacked, eps=1.0 if name == "pgd-l2" else 16, steps=steps)(images[:2], labels[:2])
    assert_untouched(model, before)


def test_attacks_on_a_model_whose_weights_require_grad_give_the_flags_back(digits_items):
    model = load_model(DIGITS)
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)  # mixed flags, as a partly frozen model has
    model.train()
    before = snapshot(model)
    images, labels = digits_items
    make_attack("autoattack", model, eps=16)(images[:2], labels[:2])
    assert_untouched(model, before)


def test_concurrent_attacks_and_predictions_on_one_model_do_not_disturb_each_other(models):
    model, sparse = models["digits"]
    before = snapshot(model)
    images, labels = images_for(DIGITS, 8, 1), torch.arange(8) % 10

    def attack(alpha, grad):
        return make_attack("pgd", sparse.at(alpha, grad), eps=16, steps=5, seed=1)(images, labels)

    def predict():
        # In the middle of the attacks: still eval mode (batch norm uses its running statistics).
        with torch.no_grad():
            return [sparse(images, alpha=0.2) for _ in range(20)]

    jobs = [lambda: attack(0.5, "exact"), lambda: attack(0.0, "exact"), lambda: attack(1.0, "straight-through"), predict]
    alone = [job() for job in jobs]
    together = run_together(jobs)
    for expected, got in zip(alone[:3], together[:3]):
        assert torch.equal(expected, got)
    assert all(torch.equal(p, alone[3][0]) for p in together[3])
    assert_untouched(model, before)


def test_overlapping_blocks_restore_the_original_state_whoever_finishes_first():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).train()
    first, second = eval_mode(model), frozen(model)
    first.__enter__()
    inner_eval, inner_frozen = eval_mode(model), frozen(model)
    inner_eval.__enter__()
    second.__enter__()
    inner_frozen.__enter__()
    first.__exit__(None, None, None)  # the first block ends while the others still run
    second.__exit__(None, None, None)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    inner_eval.__exit__(None, None, None)
    inner_frozen.__exit__(None, None, None)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_two_app_sessions_with_different_images_and_alphas_see_their_own_results():
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    def predictions(app):
        import json

        chart = next(e for e in app.get("plotly_chart") if "predictions" in e.proto.id)
        return json.loads(chart.proto.spec)["data"]

    first = AppTest.from_file("../meansparse_app/app.py", default_timeout=120).run()
    second = AppTest.from_file("../meansparse_app/app.py", default_timeout=120).run()
    first.slider(key="alpha").set_value(0.0).run()
    [b for b in second.button if (b.key or "").startswith("pick_")][1].click().run()  # another gallery image
    second.slider(key="alpha").set_value(1.8).run()
    second.button(key="FormSubmitter:attack-Attack").click().run()
    first_view, second_view = predictions(first.run()), predictions(second.run())
    assert not first.exception and not second.exception
    assert len(first_view) == 2 and len(second_view) == 4, "only the second session attacked"
    assert first_view[0]["x"] == first_view[1]["x"], "alpha 0: sparsified equals base"
    assert second_view[0]["x"] != second_view[1]["x"]
    assert first.session_state["picked"] != second.session_state["picked"]


def test_a_closed_tabs_running_and_queued_jobs_end_and_the_next_tab_gets_the_worker(models, digits_items):
    """A class closes its tabs while an AutoAttack runs and a sweep waits: both end as cancelled (the
    running one at its next pass through the model), and another student's job runs next."""
    from meansparse_core.jobs import JobQueue

    model, _ = models["digits"]
    images, labels = digits_items
    open_tabs, running = {"closed", "open"}, threading.Event()
    queue = JobQueue(workers=1)
    try:
        def autoattack(job):
            def progress(done, most):
                running.set()
                job.report(done, most)
            return make_attack("autoattack", model, eps=0.25, progress=progress)(images[:1], labels[:1])

        attack = queue.submit(autoattack, "AutoAttack of a closed tab", lambda: "closed" in open_tabs)
        sweep = queue.submit(lambda job: "rows", "sweep of a closed tab", lambda: "closed" in open_tabs)
        assert running.wait(60)
        open_tabs.discard("closed")
        assert attack.wait(60) and attack.state == "cancelled"
        after = queue.submit(lambda job: "rows", "sweep of an open tab", lambda: "open" in open_tabs)
        assert after.wait(60) and after.result() == "rows"
        assert sweep.finished and sweep.state == "cancelled"
    finally:
        queue.close()
