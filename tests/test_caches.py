"""Caches on disk: written atomically, damaged or foreign files discarded with a warning and rebuilt,
and two processes writing the same file never leave a broken one."""

import json
import multiprocessing
import sys
import types
from pathlib import Path

import pytest
import torch

from meansparse_core.evaluation import EvalResult, EvalSettings, Journal, ResultCache
from meansparse_core.outcomes import Outcomes
from meansparse_core.files import CacheWarning
from meansparse_core.models import bundled_statistics_path, find_model, load_model
from meansparse_core.statistics import Statistics, calibrate
from meansparse_core.statistics_lookup import find_statistics, statistics_path

DIGITS = find_model("bundled/digits-cnn")
CIFAR = find_model("bundled/cifar-resnet9")


@pytest.fixture(scope="module")
def model():
    return load_model(DIGITS)


def digits_statistics(model, n: int, seed: int = 0) -> Statistics:
    return calibrate(model, [torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))])


def foreign_statistics() -> Statistics:
    return Statistics.load(bundled_statistics_path(CIFAR))  # a real file, for another model


def damaged_files(model) -> dict[str, bytes]:
    good = Path("good.pt")
    digits_statistics(model, 10).save(good)
    whole = good.read_bytes()
    good.unlink()
    return {"garbage": b"\x00garbage" * 100, "empty": b"", "truncated": whole[:len(whole) // 2]}


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "foreign", "nan"])
def test_a_damaged_or_foreign_statistics_cache_is_discarded_with_a_warning(tmp_path, monkeypatch, model, kind):
    monkeypatch.chdir(tmp_path)
    cached = statistics_path(DIGITS, "digits", cache=tmp_path)
    if kind == "foreign":
        foreign_statistics().save(cached)
    elif kind == "nan":
        stats = digits_statistics(model, 10)
        payload = stats.to_payload()
        payload["taps"][0]["std"][0] = float("nan")
        torch.save(payload, cached)
    else:
        cached.write_bytes(damaged_files(model)[kind])

    with pytest.warns(CacheWarning, match=f"Discarded the cache file {cached}"):
        found = find_statistics(DIGITS, model, "digits", cache=tmp_path)
    assert "shipped with the model" in found.origin and str(cached) in found.discarded
    assert not cached.exists()

    # Rebuilt: the next calibration is cached and found again, with no warning.
    rebuilt = digits_statistics(model, 12)
    rebuilt.save(cached)
    again = find_statistics(DIGITS, model, "digits", cache=tmp_path)
    assert again.discarded is None and again.stats.fingerprint() == rebuilt.fingerprint()


def outcomes(n: int, correct: int, robust: int) -> Outcomes:
    """n items of class 0: ``correct`` predicted right, the first ``robust`` of them surviving the attack."""
    broken = [""] * robust + ["pgd"] * (correct - robust) + ["clean"] * (n - correct)
    return Outcomes((0,) * n, (0,) * correct + (1,) * (n - correct), tuple(broken))


def record(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("content", ["{not json", "[]", '{"clean_acc": 0.5}',
                                     '{"clean_acc": 0.5, "robust_acc": 0.9, "n": 10, "seconds": 1}',
                                     '{"clean_acc": NaN, "robust_acc": 0.1, "n": 10, "seconds": 1}'])
def test_a_damaged_result_is_discarded_rerun_and_rewritten(tmp_path, content):
    cache, settings, runs = ResultCache(tmp_path), EvalSettings(alpha=0.1), []

    def run(journal):
        runs.append(1)
        return EvalResult(outcomes(8, correct=6, robust=2), 1.0, settings)

    cache.get_or_run({"model": "m"}, settings, run)
    [path] = tmp_path.glob("*.json")
    path.write_text(content)
    with pytest.warns(CacheWarning, match="not a stored result"):
        result = cache.get_or_run({"model": "m"}, settings, run)
    assert (result.clean_acc, result.robust_acc, len(runs)) == (0.75, 0.25, 2)
    assert record(path)["robust_acc"] == 0.25
    assert cache.get_or_run({"model": "m"}, settings, run).robust_acc == 0.25 and len(runs) == 2


def test_a_journal_reads_each_ranks_file_once_and_keeps_its_own_batches(tmp_path, monkeypatch):
    path = tmp_path / "key.journal"
    Journal(path, rank=0).record(0, ["", "pgd"], 1.0)
    Journal(path, rank=1).record(2, ["pgd"], 2.0)
    reads, read = [], Journal._read
    monkeypatch.setattr(Journal, "_read", staticmethod(lambda file: reads.append(file.name) or read(file)))
    journal = Journal(path, rank=1)
    assert sorted(reads) == ["key.journal", "key.rank1.journal"]
    assert journal.batches == {0: (["", "pgd"], 1.0), 2: (["pgd"], 2.0)}
    journal.record(4, [""], 0.5)  # rank 1's file keeps its earlier batch and gains the new one
    assert record(tmp_path / "key.rank1.journal") == {"2": [["pgd"], 2.0], "4": [[""], 0.5]}


def test_a_failed_write_keeps_the_old_cache_and_leaves_no_temporary_file(tmp_path, monkeypatch, model):
    folder = tmp_path / "written"
    folder.mkdir()
    path = folder / "stats.pt"
    old = digits_statistics(model, 10)
    old.save(path)

    def fail_halfway(payload, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        digits_statistics(model, 20, seed=1).save(path)
    monkeypatch.undo()
    assert Statistics.load(path).fingerprint() == old.fingerprint()
    assert [p.name for p in folder.iterdir()] == ["stats.pt"]


def _write_many(path: str, seed: int, rounds: int) -> None:
    model = load_model(DIGITS)
    stats = digits_statistics(model, 10 + seed, seed)
    folder, settings = Path(path).parent / "results", EvalSettings()
    for _ in range(rounds):
        stats.save(path)
        ResultCache(folder).get_or_run({}, settings, lambda journal: EvalResult(outcomes(100 + seed, 50, 25), 1.0, settings))
        for result in folder.glob("*.json"):
            result.unlink(missing_ok=True)  # so that the next round writes it again


def _exit_codes_and_stderr(processes, capfd) -> str:
    """What a failed assertion about spawned processes shows: their exit codes and stderr (captured on fd 2)."""
    return f"exit codes {[p.exitcode for p in processes]}; stderr:\n{capfd.readouterr().err}"


def test_two_processes_writing_the_same_caches_never_leave_a_broken_file(tmp_path, model, capfd):
    path = tmp_path / "stats.pt"
    expected = {digits_statistics(model, 10 + seed, seed).fingerprint() for seed in (0, 1)}
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_many, args=(str(path), seed, 40)) for seed in (0, 1)]
    for writer in writers:
        writer.start()
    reads = 0
    while any(w.is_alive() for w in writers):
        if path.exists():
            assert Statistics.load(path).fingerprint() in expected  # one whole version or the other
            reads += 1
        for result in (tmp_path / "results").glob("*.json"):
            try:
                assert record(result)["n"] in (100, 101)
            except FileNotFoundError:
                pass  # removed by a writer between glob and read
    for writer in writers:
        writer.join()
    assert all(w.exitcode == 0 for w in writers), _exit_codes_and_stderr(writers, capfd)
    assert reads > 0 and Statistics.load(path).fingerprint() in expected
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file left behind"


def _exit_quietly() -> None:
    pass


def test_a_process_spawned_after_the_app_ran_does_its_own_work(monkeypatch, capfd):
    """Streamlit (a server, or AppTest earlier in the same pytest run) leaves app.py installed as
    ``sys.modules["__main__"]``, and a "spawn" child re-runs that file before its target: the app
    must not start there (it did, failed, and killed the two-writer test above in whole-suite runs)."""
    app = types.ModuleType("__main__")
    app.__file__ = str(Path(__file__).parents[1] / "meansparse_app" / "app.py")
    monkeypatch.setitem(sys.modules, "__main__", app)
    child = multiprocessing.get_context("spawn").Process(target=_exit_quietly)
    child.start()
    child.join()
    assert child.exitcode == 0, _exit_codes_and_stderr([child], capfd)


def test_the_app_warns_about_a_damaged_statistics_cache_and_keeps_working(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from meansparse_app.ui import loaders

    monkeypatch.chdir(tmp_path)  # the app caches statistics under ./.cache
    damaged = statistics_path(DIGITS, "digits")
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not statistics")
    loaders.cached_statistics.clear()
    loaders.cached_sparse.clear()
    try:
        with pytest.warns(CacheWarning):
            app = AppTest.from_file(str(Path(__file__).parents[1] / "meansparse_app" / "app.py"), default_timeout=120).run()
        assert not app.exception and not app.error
        assert "Discarded the cache file" in "\n".join(w.value for w in app.sidebar.warning)
        assert "shipped with the model" in "\n".join(c.value for c in app.sidebar.caption)
        assert not damaged.exists()
    finally:
        loaders.cached_statistics.clear()
        loaders.cached_sparse.clear()
