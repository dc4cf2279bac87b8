"""The bundled demo models load through the registry, with their statistics, and perform as measured."""

import json
from pathlib import Path

import pytest
import torch

from meansparse_core import Statistics, attach
from meansparse_core.data import load_dataset, load_items, sample_indices
from meansparse_core.evaluation import predict
from meansparse_core.models import ASSETS, bundled_models, bundled_statistics_path, load_model

#: Clean accuracy of each CIFAR-10 demo model on 500 test images drawn with seed 0, from its card
#: (`python -m meansparse_core evaluate --model bundled/<name> --n 500 --seed 0 ...`).
CIFAR_CLEAN_500 = {"cifar-resnet9": 0.710, "cifar-resnet9-w64": 0.822}


def test_every_manifest_in_assets_is_listed_and_loads_with_statistics():
    specs = {s.name: s for s in bundled_models()}
    assert set(specs) == {p.stem for p in ASSETS.glob("*.json")} and "digits-cnn" in specs
    for spec in specs.values():
        model = load_model(spec)
        stats = Statistics.load(bundled_statistics_path(spec))
        x = torch.rand(2, *spec.input_size)
        with torch.no_grad():
            assert torch.equal(attach(model, stats)(x, alpha=0.0), model(x))
        assert stats.meta["model"] == spec.key


def test_offline_digits_model_is_as_accurate_as_measured():
    spec = next(s for s in bundled_models() if s.name == "digits-cnn")
    model = load_model(spec)
    test = load_dataset("digits", "test")
    images, labels = load_items(test, range(len(test)))
    accuracy = (predict(model, images) == labels).float().mean().item()
    assert abs(accuracy - 0.988) <= 0.02, f"clean accuracy {accuracy:.3f}; measured 0.988 when it was trained"
    manifest = json.loads(Path(ASSETS / "digits-cnn.json").read_text())
    assert manifest["training"]["eps"] == 32.0 and manifest["threat_model"] == "Linf"


@pytest.mark.parametrize("name", CIFAR_CLEAN_500)
def test_cifar10_demo_model_is_as_accurate_as_its_card(name, shared_cifar10):
    spec = next(s for s in bundled_models() if s.name == name)
    model = load_model(spec)
    test = load_dataset("cifar10", "test", root=shared_cifar10)
    images, labels = load_items(test, sample_indices(len(test), 500, seed=0))
    accuracy = (predict(model, images) == labels).float().mean().item()
    card = CIFAR_CLEAN_500[name]
    assert abs(accuracy - card) <= 0.02, f"clean accuracy {accuracy:.3f}; the card says {card}"
    manifest = json.loads(Path(ASSETS / f"{name}.json").read_text())
    assert manifest["training"]["eps"] == 8.0 and manifest["dataset"] == "cifar10"


def test_the_gpu_trained_cifar_model_is_preferred_once_its_files_are_in_assets(tmp_path, monkeypatch):
    from meansparse_core import models

    monkeypatch.setattr(models, "ASSETS", tmp_path)
    for name in ("digits-cnn", "cifar-resnet9"):
        (tmp_path / f"{name}.json").write_text((ASSETS / f"{name}.json").read_text())
    assert models.preferred_bundled("cifar10").name == "cifar-resnet9", "the CPU model while the GPU one is absent"
    manifest = json.loads((ASSETS / "cifar-resnet9.json").read_text())
    (tmp_path / "cifar-resnet9-w64.json").write_text(json.dumps({**manifest, "architecture": "cifar-resnet9-w64"}))
    assert models.preferred_bundled("cifar10").name == "cifar-resnet9-w64"
    assert models.preferred_bundled("digits").name == "digits-cnn" and models.preferred_bundled("imagenet") is None


@pytest.mark.parametrize("name, data", [("digits-cnn", "digits"), ("cifar-resnet9", "cifar10"),
                                        ("cifar-resnet9-w64", "cifar10")])
def test_the_opening_images_default_attack_fools_the_base_model(name, data, request):
    """A class's first attack must find something: the app opens on the image ``opening_image`` picks from the
    gallery (its order, as many as the app searches) for the default attack."""
    from meansparse_app.ui.state import OPENING_CANDIDATES

    from meansparse_core.attack_choice import opening_attack
    from meansparse_core.data import DATASETS
    from meansparse_core.models import find_model
    from meansparse_core.one_image import attack_image, opening_image

    root = request.getfixturevalue("shared_cifar10") if data == "cifar10" else None
    spec = find_model(f"bundled/{name}")
    sparse = attach(load_model(spec), Statistics.load(bundled_statistics_path(spec)))
    test = load_dataset(data, "test", root=root)
    gallery = sample_indices(len(test), len(test), seed=0)[:OPENING_CANDIDATES]
    choice = opening_attack(DATASETS[data].linf_eps)
    opening = opening_image(sparse, [(i, *test[i]) for i in gallery], choice)
    image, label = test[opening.index]
    adversarial = attack_image(sparse, image, label, choice)
    assert opening.fools_base and opening.index in gallery
    assert int(predict(sparse.base, image[None])[0]) == label != int(predict(sparse.base, adversarial[None])[0])
