"""Exact calibration statistics against NumPy over the whole set, and the statistics file format."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from meansparse_core import Statistics, calibrate
from meansparse_core.statistics import RunningMoments


@pytest.mark.parametrize("shape, axis", [((5, 4, 3, 3), 1), ((5, 7, 4), 2), ((5, 3, 2, 4), 3), ((5, 4), 1)])
def test_running_moments_match_numpy_over_uneven_batches(shape, axis, device):
    gen = torch.Generator().manual_seed(0)
    # Large offset and small spread: averaging per-batch variances or float32 sums would show.
    batches = [torch.randn((n, *shape[1:]), generator=gen) * 0.01 + 1000.0 for n in (7, 13, 1, 30, 2)]
    moments = RunningMoments(shape[axis])
    for b in batches:
        moments.update(b.to(device), axis)
    everything = np.moveaxis(torch.cat(batches).double().numpy(), axis, 0).reshape(shape[axis], -1)
    assert moments.count == everything.shape[1]
    np.testing.assert_allclose(moments.mean.numpy(), everything.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(moments.std.numpy(), everything.std(axis=1), rtol=1e-9)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens", "transposed"])
def test_fused_moments_of_large_batches_match_numpy(layout, device):
    """Batches over fusion.MIN_ELEMENTS take the compiled float64 pass; strided ones take a copy."""
    from meansparse_core.statistics import _fused_moments

    gen = torch.Generator().manual_seed(1)
    shape, axis = ((64, 16, 16, 16), 1) if layout != "tokens" else ((64, 256, 24), 2)
    batches = [torch.randn((n, *shape[1:]), generator=gen) * 0.01 + 1000.0 for n in (50, 64)]
    if layout == "channels_last":
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    if layout == "transposed":  # neither contiguous nor channels-last: no view exists
        batches = [b.transpose(2, 3) for b in batches]
    moments = RunningMoments(shape[axis])
    for b in batches:
        moments.update(b.to(device), axis)
    assert layout == "transposed" or _fused_moments.kernel is not None, "the compiled pass ran"
    everything = np.moveaxis(torch.cat(batches).double().numpy(), axis, 0).reshape(shape[axis], -1)
    np.testing.assert_allclose(moments.mean.numpy(), everything.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(moments.std.numpy(), everything.std(axis=1), rtol=1e-9)


class ConvNet(nn.Module):
    """Two taps whose inputs are easy to recompute: a functional ReLU and a ReLU module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def features(self, x):
        return self.conv(x), self.bn(torch.relu(self.conv(x)))

    def forward(self, x):
        h = self.bn(torch.relu(self.conv(x)))
        return self.fc(self.act(h).mean(dim=(2, 3)))


def test_calibrate_matches_numpy_with_an_uneven_last_batch(device):
    torch.manual_seed(0)
    model = ConvNet().to(device)
    model.bn.running_mean.fill_(0.3)  # eval-mode batch norm must use these, not batch statistics
    images = torch.rand(50, 3, 8, 8)
    calls = []
    stats = calibrate(model, DataLoader(TensorDataset(images, torch.zeros(50)), batch_size=16),
                      progress=lambda done, total: calls.append((done, total)))
    assert [t.tap.name for t in stats.taps] == ["relu", "act"]
    assert calls == [(16, 50), (32, 50), (48, 50), (50, 50)]
    assert stats.meta["n_images"] == 50
    with torch.no_grad():
        model.eval()
        expected = [f.double().cpu().numpy() for f in model.features(images.to(device))]
    for tap_stats, feats in zip(stats.taps, expected):
        per_channel = np.moveaxis(feats, 1, 0).reshape(4, -1)
        assert tap_stats.count == per_channel.shape[1]
        np.testing.assert_allclose(tap_stats.mean.numpy(), per_channel.mean(axis=1), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(tap_stats.std.numpy(), per_channel.std(axis=1), rtol=1e-6, atol=1e-7)


def test_calibrate_uses_eval_mode_and_restores_the_mode():
    model = ConvNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate(model, [torch.rand(4, 3, 8, 8)])
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed during calibration"


def test_calibrate_refuses_an_empty_set():
    with pytest.raises(ValueError, match="empty"):
        calibrate(ConvNet(), [])


def test_save_and_load_round_trip_with_weights_only(tmp_path):
    stats = calibrate(ConvNet(), [torch.rand(6, 3, 8, 8)], meta={"model": "toy", "data": "random"})
    path = tmp_path / "sub" / "stats.pt"
    stats.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "meansparse-statistics" and raw["taps"][0]["mean"].dtype == torch.float64
    loaded = Statistics.load(path)
    assert loaded.meta == stats.meta
    assert loaded.tap_list == stats.tap_list
    for a, b in zip(loaded.taps, stats.taps):
        assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std) and a.count == b.count
    assert list(tmp_path.joinpath("sub").iterdir()) == [path], "no temporary file may be left behind"


def test_load_refuses_files_that_are_not_statistics(tmp_path):
    foreign = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="not a MeanSparse statistics file"):
        Statistics.load(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file")
    with pytest.raises(ValueError, match="not a readable"):
        Statistics.load(garbage)
