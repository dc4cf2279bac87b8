"""Model registry: zoo listing, local RobustBench folders, downloads, user checkpoints."""

import pytest
import torch

from meansparse_core.models import (find_model, is_local, load_checkpoint, load_model,
                                    robustbench_models, weight_files)

R18 = "robustbench/cifar10/Linf/Sehwag2021Proxy_R18"


def test_zoo_listing_is_complete_and_searchable():
    everything = robustbench_models()
    assert len(everything) > 100
    assert {s.dataset for s in everything} == {"cifar10", "cifar100", "imagenet"}
    cifar_linf = robustbench_models("cifar10", "Linf")
    assert any(s.name == "Standard" for s in cifar_linf) and all(s.threat_model == "Linf" for s in cifar_linf)
    found = robustbench_models(search="meansparse")
    assert found and all("meansparse" in s.name.lower() for s in found)
    spec = find_model(R18)
    assert spec.input_size == (3, 32, 32) and spec.num_classes == 10
    with pytest.raises(KeyError, match="Unknown model"):
        find_model("robustbench/cifar10/Linf/NoSuchModel")


def _write_random_checkpoint(spec, model_dir, **wrap):
    torch.manual_seed(0)
    from meansparse_core.models import build_random

    source = build_random(spec).eval()
    path = weight_files(spec, model_dir)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(source.state_dict(), path)
    return source, path


def test_robustbench_model_from_a_local_folder(tmp_path):
    spec = find_model(R18)
    assert not is_local(spec, tmp_path)
    source, path = _write_random_checkpoint(spec, tmp_path)
    assert path == tmp_path / "cifar10" / "Linf" / "Sehwag2021Proxy_R18.pt" and is_local(spec, tmp_path)
    model = load_model(spec, model_dir=tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert not model.training and torch.equal(model(x), source(x))


def test_user_checkpoints_load_bare_or_wrapped(tmp_path):
    """Hostile, damaged and mismatched files are in test_bad_checkpoints.py."""
    spec = find_model(R18)
    source, path = _write_random_checkpoint(spec, tmp_path)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, wrapped)
    model = load_checkpoint(spec, wrapped)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))

def test_robustbench_weights_are_downloaded_into_the_model_folder(file_server, tmp_path, monkeypatch):
    """The download path, served locally: RobustBench's file lands in its layout and loads."""
    import meansparse_core.models as models

    folder, url = file_server
    spec = find_model(R18)
    source, path = _write_random_checkpoint(spec, tmp_path / "written")
    path.rename(folder / models._zoo()[("cifar10", "Linf")][spec.name]["gdrive_id"])
    monkeypatch.setattr(models, "GDRIVE_URL", url + "/{}")
    model = load_model(spec, model_dir=tmp_path / "models")
    assert is_local(spec, tmp_path / "models")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_specs_say_what_the_model_expects():
    spec = find_model(R18)
    assert spec.class_names[0] == "airplane" and len(spec.class_names) == 10
    assert find_model("robustbench/cifar100/Linf/" + robustbench_models("cifar100", "Linf")[0].name).num_classes == 100
    assert spec.normalization == "inside the model"
