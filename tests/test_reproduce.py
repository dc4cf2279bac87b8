"""The paper's protocol as one command, the per-item file, and the table's intervals."""

import json

import pytest
import torch
from scipy.stats import binomtest

from meansparse_core import Statistics, attach, evaluation, protocol
from meansparse_core.accuracy_table import best_alpha, wilson_interval
from meansparse_core.cli import main
from meansparse_core.data import load_dataset, load_items
from meansparse_core.evaluation import predict
from meansparse_core.models import find_model, load_model
from meansparse_core.outcomes import Outcomes, read_items, write_items
from meansparse_core.statistics import calibrate
from test_distributed import finish, torchrun

REPRODUCE = ["reproduce", "--model", "bundled/digits-cnn", "--eps", "64", "--n-items", "4", "--select-n", "20",
             "--calibration-n", "100", "--alphas", "0.2,0.4", "--steps", "5", "--square-queries", "50",
             "--batch-size", "2", "--json", "--items", "items.csv", "--out", "report.md"]


@pytest.mark.parametrize("successes, n", [(0, 4), (4, 4), (1, 3), (338, 1000), (7124, 10000)])
def test_wilson_interval_matches_scipy(successes, n):
    low, high = binomtest(successes, n).proportion_ci(method="wilson")
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-12)


def test_the_app_and_the_command_line_pick_the_same_alpha_from_the_same_rows(monkeypatch):
    """One rule: the app's sweep (best_alpha) and reproduce (select_alpha) agree, at the clean-accuracy
    floor too (0.1 - 0.01 is above 0.09 in floating point: the app used to refuse that alpha)."""
    from types import SimpleNamespace

    rows = [{"alpha": 0.0, "clean": 0.10, "robust": 0.040}, {"alpha": 0.1, "clean": 0.09, "robust": 0.045},
            {"alpha": 0.2, "clean": 0.08, "robust": 0.050}, {"alpha": 0.3, "clean": 0.095, "robust": 0.045}]
    results = [SimpleNamespace(settings=SimpleNamespace(alpha=r["alpha"]), clean_acc=r["clean"], robust_acc=r["robust"])
               for r in rows]
    monkeypatch.setattr(protocol, "sweep", lambda *args, **kwargs: results)
    chosen = protocol.select_alpha(None, None, None, protocol.Protocol(max_clean_drop=0.01), None, {}).alpha
    assert chosen == best_alpha(rows) == 0.1


def test_per_item_file_round_trips_and_gives_the_accuracies(tmp_path):
    runs = [("alpha=0.2 pgd", Outcomes((3, 1, 4), (3, 1, 0), ("", "pgd", "clean"))),
            ("alpha=0 autoattack", Outcomes((3, 1, 4), (3, 1, 4), ("apgd-t", "", "square")))]
    write_items(tmp_path / "items.csv", runs, [10, 7, 2], [f"class {c}" for c in range(5)])
    read = read_items(tmp_path / "items.csv")
    assert read == {name: ([10, 7, 2], outcomes) for name, outcomes in runs}
    lines = (tmp_path / "items.csv").read_text().splitlines()
    assert lines[:2] == ["run,index,label,clean_pred,robust,broken_by,label_name,clean_pred_name",
                         "alpha=0.2 pgd,10,3,3,1,,class 3,class 3"]
    old_format = "\n".join(",".join(line.split(",")[:6]) for line in lines)  # before the name columns
    (tmp_path / "old.csv").write_text(old_format)
    assert read_items(tmp_path / "old.csv") == read
    with pytest.raises(ValueError, match="beyond the 4 class names"):
        write_items(tmp_path / "items.csv", runs, [10, 7, 2], ["a", "b", "c", "d"])
    assert (read["alpha=0.2 pgd"][1].clean_acc, read["alpha=0.2 pgd"][1].robust_acc) == (2 / 3, 1 / 3)
    (tmp_path / "bad.csv").write_text("run,index\nx,1\n")
    with pytest.raises(ValueError, match="not a per-item results file"):
        read_items(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="contradicts"):
        Outcomes((3,), (2,), ("",))  # a wrong clean prediction cannot be robust


@pytest.mark.parametrize("row", ["alpha=0 pgd,10,3", "alpha=0 pgd,10,3,3,1,,x,y,z", "alpha=0 pgd,ten,3,3,1,"])
def test_a_damaged_per_item_file_is_a_value_error_as_promised(tmp_path, row):
    """A row cut short, one with a field too many, or a word for a number: ValueError naming the line
    (a short row used to raise TypeError)."""
    (tmp_path / "items.csv").write_text("run,index,label,clean_pred,robust,broken_by\n" + row + "\n")
    with pytest.raises(ValueError, match="line 2"):
        read_items(tmp_path / "items.csv")


def test_reproduce_runs_end_to_end_under_torchrun_and_a_rerun_reads_everything_back(tmp_path, monkeypatch, capsys):
    code, out, err = finish(torchrun(["-m", "meansparse_core", "--", *REPRODUCE], tmp_path))
    assert code == 0, err[-2000:]
    shared = json.loads(out)
    assert shared["world_size"] == 2 and shared["alpha"] in (0.2, 0.4) and shared["n"] == 4
    assert set(shared["test"]) == {"base autoattack", "meansparse autoattack", "meansparse apgd-ce bpda",
                                   "meansparse square"}
    report = (tmp_path / "report.md").read_text()
    assert "| Model | Clean | AutoAttack | APGD-CE + BPDA | Square |" in report and "held-out" in report
    items = read_items(tmp_path / "items.csv")
    for name, record in shared["test"].items():
        [outcomes] = [o for run, (_, o) in items.items() if run.startswith(name)]
        assert (outcomes.clean_acc, outcomes.robust_acc) == (record["clean_acc"], record["robust_acc"])

    def no_attack(*args):
        raise AssertionError("a cached evaluation was attacked again")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluation, "_attack_batch", no_attack)
    assert main([*REPRODUCE[:-4], "--items", "again.csv", "--out", "again.md"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["world_size"] == 1 and again["alpha"] == shared["alpha"]
    assert {k: r["robust_acc"] for k, r in again["test"].items()} == {k: r["robust_acc"] for k, r in shared["test"].items()}
    assert read_items(tmp_path / "again.csv") == items


def test_reproduce_with_the_authors_estimator_calibrates_in_stored_order_and_two_ranks_match_one(tmp_path, monkeypatch,
                                                                                                  capsys):
    """Held-out slice: the training split's last images; statistics: the authors' average over the first
    images in stored order, the same bits under torchrun with two ranks as in one process."""
    args = [*REPRODUCE[:-4], "--estimator", "authors", "--calibration-batch-size", "16", "--out", "report.md"]
    (tmp_path / "two").mkdir()
    code, out, err = finish(torchrun(["-m", "meansparse_core", "--", *args], tmp_path / "two"))
    assert code == 0, err[-2000:]
    shared = json.loads(out)
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0
    single = json.loads(capsys.readouterr().out)

    [two] = (tmp_path / "two" / ".cache" / "stats" / "reproduce").glob("*.pt")
    [one] = (tmp_path / ".cache" / "stats" / "reproduce").glob("*.pt")
    model = load_model(find_model("bundled/digits-cnn"))
    train = load_dataset("digits", "train")
    first, _ = load_items(train, range(100))  # --calibration-n 100, in stored order
    expected = calibrate(model, first.split(16), estimator="authors")
    for stats in (Statistics.load(two), Statistics.load(one)):
        assert stats.meta["estimator"] == "authors" and stats.meta["n_images"] == 100
        for mine, theirs in zip(stats.taps, expected.taps, strict=True):
            assert torch.equal(mine.mean, theirs.mean) and torch.equal(mine.std, theirs.std)

    # Alpha was selected on the last 20 training images: their clean accuracy at every alpha.
    held_out, labels = load_items(train, range(len(train) - 20, len(train)))
    sparse = attach(model, expected)
    for record in shared["selection"]:
        assert record["clean_acc"] == (predict(sparse.at(record["alpha"]), held_out) == labels).sum().item() / 20

    def figures(result):
        return [(r["alpha"], r["clean_acc"], r["robust_acc"]) for r in result["selection"]]

    assert figures(shared) == figures(single) and shared["alpha"] == single["alpha"]
    for result in (shared, single):
        assert result["estimator"] == "authors" and "the last 20 training images in stored order" in result["held_out"]
    report = (tmp_path / "two" / "report.md").read_text()
    assert "the authors' estimator" in report and "the last 20 training images in stored order" in report
