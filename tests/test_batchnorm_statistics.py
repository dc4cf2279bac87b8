"""Statistics without the training set: read from the BatchNorm layers that feed the taps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from meansparse_core import attach
from meansparse_core.batchnorm_statistics import (MissingStatistics, batchnorm_feeds, batchnorm_statistics,
                                                  describe_sources)
from meansparse_core.cli import main
from meansparse_core.models import bundled_statistics_path, find_model, load_model
from meansparse_core.discovery import find_taps
from meansparse_core.statistics import Statistics, calibrate


class Block(nn.Module):
    """conv-bn-relu, then a torchvision-style second half: bn, in-place shortcut addition, relu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.drop = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.drop(self.bn1(self.conv1(x))))  # through dropout: still the BatchNorm's output
        shortcut = out
        out = self.bn2(self.conv2(out))
        out += shortcut  # in place: the relu's input is no longer the BatchNorm's output
        return torch.relu(out)


def test_taps_fed_through_dropout_count_and_an_in_place_sum_does_not():
    model = Block().eval()
    taps = find_taps(model, torch.zeros(1, 3, 8, 8))
    assert batchnorm_feeds(model, taps, torch.zeros(1, 3, 8, 8)) == {taps[0].name: "bn1"}


def test_statistics_read_from_batchnorm_equal_exact_ones_when_running_statistics_are_exact():
    """With running_mean / running_var set to the exact moments of the BatchNorm's input, the tap's
    exact statistics are bias and |weight| * sqrt(var / (var + eps)), channel by channel."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, eps=0.1)
    model = nn.Sequential(conv, bn, nn.ReLU()).eval()
    images = torch.rand(40, 3, 10, 10)
    with torch.no_grad():
        features = conv(images).double()
        bn.running_mean.copy_(features.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(features.var(dim=(0, 2, 3), correction=0))
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0, -3.0, 0.25]))
        bn.bias.copy_(torch.randn(5))
    free = batchnorm_statistics(model, (3, 10, 10))
    exact = calibrate(model, images.split(8))
    np.testing.assert_allclose(free.taps[0].mean.numpy(), exact.taps[0].mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(free.taps[0].std.numpy(), exact.taps[0].std.numpy(), rtol=1e-5)
    assert free.taps[0].source == "BatchNorm 1" and free.meta["estimator"] == "batchnorm"


def test_taps_no_batchnorm_feeds_take_the_photos_given():
    model = Block().eval()
    photos = torch.rand(6, 3, 8, 8)
    stats = batchnorm_statistics(model, (3, 8, 8), photos=photos, photos_source="6 photos")
    exact = calibrate(model, photos.split(3))
    assert [t.source for t in stats.taps] == ["BatchNorm bn1", "6 photos"]
    torch.testing.assert_close(stats.taps[1].std, exact.taps[1].std)
    assert describe_sources(stats) == "BatchNorm layers at 1 of 2 taps, 6 photos at 1 of 2 taps"


def test_taps_without_a_batchnorm_and_no_photos_are_named_and_refused():
    with pytest.raises(MissingStatistics, match=r"No BatchNorm feeds 1 of the 2 taps of Block \(relu#2\)"):
        batchnorm_statistics(Block().eval(), (3, 8, 8))
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    plain(torch.zeros(1, 3, 8, 8))
    with pytest.raises(MissingStatistics, match="Sequential has no BatchNorm layer feeding its taps.*built-in photos"):
        batchnorm_statistics(plain.eval(), (3, 8, 8))


def test_sources_are_saved_with_the_statistics_and_older_files_read_without(tmp_path):
    stats = batchnorm_statistics(Block().eval(), (3, 8, 8), photos=torch.rand(2, 3, 8, 8), photos_source="2 photos")
    stats.save(tmp_path / "s.pt")
    assert [t.source for t in Statistics.load(tmp_path / "s.pt").taps] == ["BatchNorm bn1", "2 photos"]
    payload = stats.to_payload()
    for tap in payload["taps"]:
        del tap["source"]
    assert Statistics.from_payload(payload).taps[0].source == ""


def test_cli_calibrates_the_cifar_demo_model_with_no_data_set(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    monkeypatch.setenv("MEANSPARSE_DATA", str(empty))
    out = tmp_path / "bn.pt"
    assert main(["calibrate", "--model", "bundled/cifar-resnet9-w64", "--estimator", "batchnorm", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["taps"] == 8 and all(s.startswith("BatchNorm ") for s in summary["sources"].values())
    assert not any(empty.iterdir())  # nothing was downloaded
    stats = Statistics.load(out)
    exact = Statistics.load(bundled_statistics_path(find_model("bundled/cifar-resnet9-w64")))
    assert stats.tap_list == exact.tap_list
    # The estimate is close to the exact statistics (within a tenth of sigma) without being them.
    error = [float(((s.std - e.std).abs() / e.std).median()) for s, e in zip(stats.taps, exact.taps)]
    assert 0 < max(error) < 0.1


def test_cli_evaluate_uses_the_statistics_file(tmp_path, monkeypatch, capsys, shared_cifar10):
    out = tmp_path / "bn.pt"
    assert main(["calibrate", "--model", "bundled/cifar-resnet9-w64", "--estimator", "batchnorm", "--out", str(out)]) == 0
    capsys.readouterr()
    argv = ["evaluate", "--model", "bundled/cifar-resnet9-w64", "--data-dir", str(shared_cifar10), "--n", "40",
            "--attack", "fgsm", "--eps", "0", "--alpha", "1.5", "--no-cache", "--json"]
    assert main([*argv, "--stats", str(out)]) == 0
    record = json.loads(capsys.readouterr().out)
    from meansparse_core.data import load_dataset, load_items, sample_indices

    test = load_dataset("cifar10", "test", shared_cifar10)
    images, labels = load_items(test, sample_indices(len(test), 40, 0))
    model = load_model(find_model("bundled/cifar-resnet9-w64"))
    with torch.no_grad():
        right = (attach(model, Statistics.load(out))(images, 1.5).argmax(1) == labels).float().mean()
    assert record["clean_acc"] == pytest.approx(float(right))


def test_cli_refuses_taps_without_batchnorm_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "bn.pt"
    assert main(["calibrate", "--model", "bundled/digits-cnn", "--estimator", "batchnorm", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "No BatchNorm feeds 1 of the 4 taps" in error and "(14)" in error
    assert not out.exists()


def test_cli_takes_a_folder_of_photos_for_the_other_taps(tmp_path, capsys):
    folder = tmp_path / "photos" / "any" / "depth"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40 + i, 30), (80 * i, 20, 200)).save(folder / f"{i}.jpg")
    out = tmp_path / "bn.pt"
    assert main(["calibrate", "--model", "bundled/digits-cnn", "--estimator", "batchnorm", "--out", str(out),
                 "--data-dir", str(tmp_path / "photos")]) == 0
    sources = [t.source for t in Statistics.load(out).taps]
    assert sources[:3] == ["BatchNorm 2", "BatchNorm 5", "BatchNorm 9"]
    assert sources[3] == f"3 photos from {tmp_path / 'photos'}"


def test_cli_built_in_photos_for_the_other_taps(tmp_path):
    pytest.importorskip("skimage")
    out = tmp_path / "bn.pt"
    assert main(["calibrate", "--model", "bundled/digits-cnn", "--estimator", "batchnorm", "--out", str(out),
                 "--builtin-photos"]) == 0
    assert Statistics.load(out).taps[3].source == "5 built-in photos"
