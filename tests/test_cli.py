"""The command line, end to end on a RobustBench architecture in a local model folder."""

import csv
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from meansparse_core import Statistics, attach
from meansparse_core.cli import main, progress_bar
from meansparse_core.data import CIFAR10_CLASSES
from meansparse_core.export import load_sparsified
from meansparse_core.models import build_random, find_model, load_model, rebuild, weight_files
from meansparse_core.outcomes import COLUMNS

R18 = "robustbench/cifar10/Linf/Sehwag2021Proxy_R18"
RECORD_FIELDS = {"model", "data", "n", "seed", "alpha", "attack", "eps", "steps", "grad", "clean_acc",
                 "robust_acc", "seconds"}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A local model folder with random R18 weights and a tiny CIFAR-style ImageFolder tree."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    path = weight_files(find_model(R18), tmp_path / "models")[0]
    path.parent.mkdir(parents=True)
    torch.save(build_random(find_model(R18)).state_dict(), path)
    for split in ["train", "test"]:
        for label, cls in enumerate(["airplane", "automobile"]):
            folder = tmp_path / "cifar" / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), (60 * i, 100 * label, 30)).save(folder / f"{i}.png")
    return ["--model", R18, "--model-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "cifar")]


def run_json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_calibrate_evaluate_sweep_export(workspace, capsys, tmp_path):
    calibrated = run_json(capsys, ["calibrate", *workspace, "--n", "6"])
    assert calibrated["taps"] == 17 and calibrated["n"] == 6
    attack = ["--attack", "fgsm", "--eps", "8", "--steps", "1", "--n", "5"]
    record = run_json(capsys, ["evaluate", *workspace, *attack, "--alpha", "0.3"])
    assert RECORD_FIELDS <= set(record) and record["n"] == 5 and record["alpha"] == 0.3
    assert 0 <= record["robust_acc"] <= record["clean_acc"] <= 1
    table = run_json(capsys, ["sweep", *workspace, *attack, "--alphas", "0,0.2,0.4"])
    assert [r["alpha"] for r in table] == [0.0, 0.2, 0.4] and all(RECORD_FIELDS <= set(r) for r in table)
    out, program = tmp_path / "r18-sparse.pt", tmp_path / "r18-sparse.pt2"
    exported = run_json(capsys, ["export", *workspace, "--alpha", "0.3", "--out", str(out), "--program", str(program)])
    assert exported == {"model": R18, "alpha": 0.3, "file": str(out), "program": str(program)}
    loaded = load_sparsified(out, rebuild)
    reference = attach(load_model(find_model(R18), workspace[3]), Statistics.load(calibrated["statistics"]))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x, alpha=0.3)
        assert torch.equal(loaded.module(x), expected)
        assert torch.allclose(torch.export.load(program).module()(x), expected, atol=1e-5)


def test_progress_bar_appears_only_when_a_step_has_work(capsys):
    with progress_bar("weights already on disk"):
        pass
    assert capsys.readouterr().err == ""
    with progress_bar("alphas", unit="alpha") as update:
        update(0.5, 2)
    assert "alphas" in capsys.readouterr().err


def test_version_says_which_implementation_runs_the_operator(capsys):
    from meansparse_core import native

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and f"operator on CPUs: {native.describe()}" in out


def test_models_lists_the_zoo_and_marks_local_weights(workspace, capsys):
    rows = run_json(capsys, ["models", "--search", "Proxy_R18", "--model-dir", workspace[3]])
    assert {(r["key"], r["local"]) for r in rows} == {(R18, True), (R18.replace("Linf", "L2"), False)}
    rows = run_json(capsys, ["models", "--dataset", "cifar10", "--threat", "Linf", "--search", "Proxy_R18"])
    assert [r["key"] for r in rows] == [R18]


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--model", "robustbench/cifar10/Linf/Nope"], "Unknown model"),
    (["evaluate", "--model", R18, "--model-dir", "empty"], "put the file at"),
    (["evaluate", "--model", R18, "--n", "0"], "--n must be at least 1"),
])
def test_errors_are_one_line_with_exit_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err


def test_missing_data_names_the_folder(workspace, capsys, tmp_path):
    args = [a if a != str(tmp_path / "cifar") else str(tmp_path / "nothing-here") for a in workspace]
    assert main(["calibrate", *args, "--n", "2"]) == 2
    assert "put that file at" in capsys.readouterr().err


def test_bad_arguments_exit_2():
    for argv in [["sweep", "--model", R18, "--alphas", "a,b"], ["evaluate", "--model", R18, "--eps", "-1"], []]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "meansparse_core", "models", "--search", "Standard", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "robustbench/cifar10/Linf/Standard" in {r["key"] for r in json.loads(result.stdout)}


def test_user_checkpoint_gets_its_own_statistics(workspace, capsys, tmp_path):
    torch.manual_seed(1)
    checkpoint = tmp_path / "mine.pt"
    torch.save(build_random(find_model(R18)).state_dict(), checkpoint)
    base = run_json(capsys, ["calibrate", *workspace, "--n", "4"])
    mine = run_json(capsys, ["calibrate", *workspace, "--n", "4", "--checkpoint", str(checkpoint)])
    assert mine["statistics"] != base["statistics"]
    assert Statistics.load(mine["statistics"]).fingerprint() != Statistics.load(base["statistics"]).fingerprint()
    record = run_json(capsys, ["evaluate", *workspace, "--checkpoint", str(checkpoint), "--n", "3",
                               "--attack", "fgsm", "--alpha", "0.2"])
    assert record["n"] == 3


def test_placement_estimator_and_published_alpha(workspace, capsys, tmp_path):
    assert main(["calibrate", *workspace, "--n", "6", "--estimator", "authors", "--placement", "released", "--json"]) == 0
    out, err = capsys.readouterr()
    authors = json.loads(out)
    assert "warning: these training images come from an ImageFolder tree, sorted by class" in err
    stats = Statistics.load(authors["statistics"])
    assert stats.meta["estimator"] == "authors" and stats.placement.name == "released" and len(stats.taps) == 17
    assert stats.meta["n_images"] == 6 and authors["statistics"].endswith("__released.pt")
    # Released statistics are found again for --placement released; the activations file does not exist.
    attack = ["--attack", "fgsm", "--eps", "8", "--steps", "1", "--n", "2"]
    assert run_json(capsys, ["evaluate", *workspace, *attack, "--placement", "released"])["alpha"] == 0.0
    for argv, message in [
        (["evaluate", *workspace, "--stats", authors["statistics"], "--placement", "activations"],
         "computed with the released (ResNet) placement, not activations"),
        (["evaluate", *workspace, "--placement", "released", "--alpha", "published"], "--alpha published needs"),
        (["calibrate", *workspace, "--placement", "nowhere"], "Unknown placement 'nowhere'"),
        (["calibrate", *workspace, "--placement", "layer9.*:output"], "matches no module"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_the_per_item_file_names_the_classes_and_other_data_is_refused(workspace, capsys, tmp_path):
    run_json(capsys, ["calibrate", *workspace, "--n", "6"])
    attack = ["evaluate", *workspace, "--attack", "fgsm", "--eps", "8", "--steps", "1", "--n", "6"]
    run_json(capsys, [*attack, "--items", "items.csv"])
    with open(tmp_path / "items.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [*COLUMNS, "label_name", "clean_pred_name"] and len(rows) == 6
    assert {r["label_name"] for r in rows} == {"airplane", "automobile"}
    for row in rows:
        assert (row["label_name"], row["clean_pred_name"]) == (CIFAR10_CLASSES[int(row["label"])],
                                                              CIFAR10_CLASSES[int(row["clean_pred"])])
    assert main(["calibrate", *workspace, "--data", "cifar100"]) == 2  # 32x32 images too, but 100 other classes
    assert "takes cifar10 images, not cifar100; pick --data cifar10" in capsys.readouterr().err


def test_calibrate_reads_the_training_images_one_batch_at_a_time(tmp_path, monkeypatch, capsys):
    """So that a large training set never sits in memory at once (and a torchrun rank reads only its share)."""
    from meansparse_core import data
    from meansparse_core.statistics import calibrate

    read, load_items = [], data.load_items
    monkeypatch.setattr(data, "load_items", lambda dataset, indices: read.append(len(indices)) or load_items(dataset, indices))
    run_json(capsys, ["calibrate", "--model", "bundled/digits-cnn", "--n", "40", "--batch-size", "16",
                      "--estimator", "authors", "--out", str(tmp_path / "stats.pt")])
    assert read == [16, 16, 8]
    images, _ = load_items(data.load_dataset("digits", "train"), range(40))
    expected = calibrate(load_model(find_model("bundled/digits-cnn")), images.split(16), estimator="authors")
    assert Statistics.load(tmp_path / "stats.pt").fingerprint() == expected.fingerprint()
