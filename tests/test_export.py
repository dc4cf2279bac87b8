"""Saving, loading and exporting sparsified models, on two toy models calibrated on random images."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meansparse_core import attach, calibrate
from meansparse_core.export import FORMAT, VERSION, export_program, load_sparsified, save_sparsified

ALPHA = 0.5


class ModuleNet(nn.Module):
    """Activations as nn.ReLU modules, on flat features."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
        )

    def forward(self, x):
        return self.net(x)


class FunctionalConvNet(nn.Module):
    """A tiny conv net calling F.relu (and torch.relu) inside forward, with BatchNorm buffers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return self.head(h.mean(dim=(2, 3)))


class BranchyNet(nn.Module):
    """Python control flow on a tensor value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 3)

    def forward(self, x):
        h = F.relu(self.fc(x.flatten(1)))
        return h if h.sum() > 0 else -h


ARCHITECTURES = {"module": ModuleNet, "functional": FunctionalConvNet, "branchy": BranchyNet}


def build(architecture: dict) -> nn.Module:
    # A fresh, randomly initialised model: loading must overwrite every weight from the file.
    return ARCHITECTURES[architecture["name"]]()


def _calibrated(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]().eval()
    if isinstance(model, FunctionalConvNet):
        # Non-trivial BatchNorm buffers, so that a forgotten buffer would change the logits.
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    stats = calibrate(model, [torch.randn(16, 3, 4, 4) for _ in range(2)])
    return model, stats


@pytest.fixture(params=["module", "functional"])
def calibrated(request):
    model, stats = _calibrated(request.param)
    return request.param, model, stats


@pytest.fixture
def x():
    return torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def _reference(model, stats, x, alpha, layer_alphas=None):
    sparse = attach(model, stats)
    try:
        with torch.no_grad():
            return sparse(x, alpha=alpha, layer_alphas=layer_alphas)
    finally:
        sparse.detach()


@pytest.mark.parametrize("use_layer_alphas", [False, True])
def test_round_trip_gives_identical_logits(tmp_path, calibrated, x, use_layer_alphas):
    name, model, stats = calibrated
    layer_alphas = {stats.taps[0].tap.name: 2.0} if use_layer_alphas else None
    path = tmp_path / "model.pt"
    save_sparsified(path, model, stats, ALPHA, layer_alphas, architecture={"source": "bundled", "name": name})

    loaded = load_sparsified(path, build)
    try:
        with torch.no_grad():
            got = loaded.module(x)
            base = model(x)
        expected = _reference(model, stats, x, ALPHA, layer_alphas)
        assert torch.equal(got, expected)
        assert not torch.equal(got, base)
        if use_layer_alphas:
            # The per-layer override really travelled: without it the logits differ.
            assert not torch.equal(got, _reference(model, stats, x, ALPHA))
        assert loaded.alpha == ALPHA
        assert loaded.layer_alphas == (layer_alphas or {})
        assert loaded.architecture == {"source": "bundled", "name": name}
        assert loaded.stats.tap_list == stats.tap_list
        assert not loaded.model.training
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[key], value), key
    finally:
        loaded.sparse.detach()


def test_file_is_plain_containers_only(tmp_path, calibrated):
    name, model, stats = calibrated
    path = tmp_path / "model.pt"
    architecture = {"source": "robustbench", "name": name, "dataset": "cifar10", "threat_model": "Linf"}
    save_sparsified(path, model, stats, ALPHA, architecture=architecture)

    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["version"] == VERSION
    assert payload["architecture"] == architecture
    assert payload["alpha"] == ALPHA and payload["layer_alphas"] == {}
    assert payload["statistics"]["format"] == "meansparse-statistics"
    assert [t["name"] for t in payload["taps"]] == [t.name for t in stats.tap_list]
    assert set(payload["state_dict"]) == set(model.state_dict())


def test_no_temporary_files_left_behind(tmp_path, calibrated):
    name, model, stats = calibrated
    save_sparsified(tmp_path / "a.pt", model, stats, ALPHA, architecture={"name": name})
    save_sparsified(tmp_path / "a.pt", model, stats, 0.25, architecture={"name": name})  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]


def test_failed_save_keeps_old_file_and_leaves_nothing(tmp_path, monkeypatch):
    model, stats = _calibrated("module")
    path = tmp_path / "a.pt"
    save_sparsified(path, model, stats, ALPHA, architecture={"name": "module"})
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            f.write(b"half a file")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_sparsified(path, model, stats, 0.25, architecture={"name": "module"})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]
    assert torch.load(path, weights_only=True)["alpha"] == ALPHA


def test_save_refuses_bad_arguments(tmp_path):
    model, stats = _calibrated("module")
    path = tmp_path / "a.pt"
    with pytest.raises(ValueError, match="architecture"):
        save_sparsified(path, model, stats, ALPHA, architecture={"name": object()})
    with pytest.raises(ValueError, match="alpha"):
        save_sparsified(path, model, stats, -1.0, architecture={"name": "module"})
    with pytest.raises(KeyError, match="no-such-tap"):
        save_sparsified(path, model, stats, ALPHA, {"no-such-tap": 1.0}, architecture={"name": "module"})
    assert os.listdir(tmp_path) == []


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears only if the pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": VERSION, "state_dict": _Payload(marker)}, path)

    with pytest.raises(ValueError, match="not a safely readable"):
        load_sparsified(path, build)
    assert not marker.exists()

    # The payload is live: unsafe loading does run it (the marker proves the test above means something).
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_plain_state_dict_is_refused(tmp_path):
    model, _ = _calibrated("module")
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="not a MeanSparse sparsified-model file"):
        load_sparsified(path, build)


def test_other_version_is_refused(tmp_path):
    model, stats = _calibrated("module")
    path = tmp_path / "a.pt"
    save_sparsified(path, model, stats, ALPHA, architecture={"name": "module"})
    payload = torch.load(path, weights_only=True)
    payload["version"] = VERSION + 1
    torch.save(payload, path)
    with pytest.raises(ValueError, match="version"):
        load_sparsified(path, build)


def test_mismatched_architecture_names_keys(tmp_path):
    model, stats = _calibrated("module")
    path = tmp_path / "a.pt"
    save_sparsified(path, model, stats, ALPHA, architecture={"name": "module"})
    with pytest.raises(ValueError) as info:
        load_sparsified(path, lambda architecture: FunctionalConvNet())
    message = str(info.value)
    assert "missing keys" in message and "conv1.weight" in message
    assert "unexpected keys" in message and "net.1.weight" in message


def test_mismatched_shapes_are_refused(tmp_path):
    model, stats = _calibrated("module")
    path = tmp_path / "a.pt"
    save_sparsified(path, model, stats, ALPHA, architecture={"name": "module"})

    def wider(architecture):
        other = ModuleNet()
        other.net[5] = nn.Linear(16, 5)
        return other

    with pytest.raises(ValueError, match="size mismatch"):
        load_sparsified(path, wider)


def test_export_program_round_trip(tmp_path, calibrated, x):
    name, model, stats = calibrated
    sparse = attach(model, stats)
    try:
        fixed = sparse.at(ALPHA, layer_alphas={stats.taps[-1].tap.name: 1.5})
        with torch.no_grad():
            expected = fixed(x)
        path = tmp_path / "model.pt2"
        export_program(fixed, x, path)
        assert sorted(os.listdir(tmp_path)) == ["model.pt2"]

        loaded = torch.export.load(path)
        assert not [n for n in loaded.graph.nodes if "meansparse" in str(n.target)], "PyTorch's own operations only"
        program = loaded.module()
        with torch.no_grad():
            assert torch.allclose(program(x), expected, rtol=0, atol=1e-6)
            assert not torch.allclose(program(x), model(x), rtol=0, atol=1e-6)
            # The batch size stays free, and the eager module still works after tracing.
            other = torch.randn(3, 3, 4, 4)
            assert torch.allclose(program(other), fixed(other), rtol=0, atol=1e-6)
            assert torch.equal(fixed(x), expected)
    finally:
        sparse.detach()


def test_export_program_from_loaded_file(tmp_path, x):
    model, stats = _calibrated("functional")
    save_sparsified(tmp_path / "a.pt", model, stats, ALPHA, architecture={"name": "functional"})
    loaded = load_sparsified(tmp_path / "a.pt", build)
    try:
        export_program(loaded.module, x, tmp_path / "a.pt2")
        with torch.no_grad():
            got = torch.export.load(tmp_path / "a.pt2").module()(x)
        assert torch.allclose(got, _reference(model, stats, x, ALPHA), rtol=0, atol=1e-6)
    finally:
        loaded.sparse.detach()


def test_export_program_refuses_untraceable_model_clearly(tmp_path, x):
    model, stats = _calibrated("branchy")
    sparse = attach(model, stats)
    try:
        with pytest.raises(ValueError, match="cannot be exported as a standalone program: ") as info:
            export_program(sparse.at(ALPHA), x, tmp_path / "b.pt2")
        assert "\n" not in str(info.value)
        assert os.listdir(tmp_path) == []
        with torch.no_grad():  # the failed trace left the placement working
            assert torch.equal(sparse(x, alpha=ALPHA), sparse.at(ALPHA)(x))
    finally:
        sparse.detach()
