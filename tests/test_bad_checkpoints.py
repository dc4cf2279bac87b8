"""Checkpoints and other weight files: nothing a file holds is ever run, and every refusal names what is wrong.

Covers a user's uploaded checkpoint, a file in the RobustBench model folder and a statistics file;
exported MeanSparse files have their own refusals in test_export.py.
"""

from pathlib import Path

import pytest
import torch

from meansparse_core.architectures import build_architecture
from meansparse_core.models import build_random, find_model, load_checkpoint, load_model, weight_files
from meansparse_core.statistics import Statistics

DIGITS = find_model("bundled/digits-cnn")
R18 = find_model("robustbench/cifar10/Linf/Sehwag2021Proxy_R18")
ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this creates a file: proof that code in a checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def hostile(path: Path, marker: Path, wrap=lambda payload: {"conv.weight": payload}) -> Path:
    torch.save(wrap(Payload(marker)), path)
    return path


def digits_weights() -> dict:
    return build_random(DIGITS).state_dict()


@pytest.mark.parametrize("wrap", [lambda p: {"conv.weight": p}, lambda p: {"state_dict": p}, lambda p: p])
def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path, wrap):
    marker = tmp_path / "code-ran"
    with pytest.raises(ValueError, match="evil.pt is not a plain PyTorch weights file"):
        load_checkpoint(DIGITS, hostile(tmp_path / "evil.pt", marker, wrap))
    assert not marker.exists()


def test_a_robustbench_folder_file_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    path = weight_files(R18, tmp_path)[0]
    path.parent.mkdir(parents=True)
    hostile(path, marker)
    with pytest.raises(ValueError, match=f"{path.name} .*replace it with RobustBench's file"):
        load_model(R18, model_dir=tmp_path)
    assert not marker.exists()


def test_a_statistics_file_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    with pytest.raises(ValueError, match="not a readable MeanSparse statistics file"):
        Statistics.load(hostile(tmp_path / "stats.pt", marker, lambda p: {"format": p}))
    assert not marker.exists()


def test_the_wrong_architecture_names_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(build_random(R18).state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet.pt do not fit .*missing keys \[.*\], unexpected keys \['bn1"):
        load_checkpoint(DIGITS, path)
    same_names = {k: torch.zeros(3) if v.is_floating_point() else v for k, v in digits_weights().items()}
    torch.save(same_names, path)
    with pytest.raises(ValueError, match="do not fit .*size mismatch"):
        load_checkpoint(DIGITS, path)


@pytest.mark.parametrize("name, content", [
    ("empty.pt", b""),
    ("text.pt", b"these are not weights\n"),
    ("image.pt", b"\x89PNG\r\n\x1a\n" + bytes(100)),
])
def test_files_that_are_not_checkpoints_are_refused_in_one_sentence(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"{name} is not a plain PyTorch weights file") as refused:
        load_checkpoint(DIGITS, tmp_path / name)
    assert "\n" not in str(refused.value)


def test_truncated_checkpoints_are_refused(tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save(digits_weights(), whole)
    data = whole.read_bytes()
    for keep in (0.1, 0.5, 0.99):
        cut = tmp_path / f"cut{keep}.pt"
        cut.write_bytes(data[:int(len(data) * keep)])
        with pytest.raises(ValueError, match="is not a plain PyTorch weights file"):
            load_checkpoint(DIGITS, cut)
    robustbench = weight_files(R18, tmp_path / "zoo")[0]
    robustbench.parent.mkdir(parents=True)
    torch.save(build_random(R18).state_dict(), robustbench)
    robustbench.write_bytes(robustbench.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="could not be loaded"):
        load_model(R18, model_dir=tmp_path / "zoo")


def test_checkpoints_without_a_state_dict_or_with_nan_weights_are_refused(tmp_path):
    cases = {"tensor.pt": torch.zeros(3), "list.pt": [torch.zeros(3)], "numbers.pt": {"conv.weight": 1.0}}
    for name, content in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError, match="holds no state dict of tensors"):
            load_checkpoint(DIGITS, tmp_path / name)
    diverged = digits_weights()
    first = next(k for k, v in diverged.items() if v.is_floating_point())
    diverged[first][0] = float("nan")
    torch.save(diverged, tmp_path / "diverged.pt")
    with pytest.raises(ValueError, match="NaN or infinite values"):
        load_checkpoint(DIGITS, tmp_path / "diverged.pt")


def test_a_good_checkpoint_still_loads_after_the_bad_ones(tmp_path):
    source = build_architecture("digits-cnn").eval()
    torch.save(source.state_dict(), tmp_path / "good.pt")
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(DIGITS, tmp_path / "good.pt")(x), source(x))


def test_uploads_are_limited_in_the_server_config():
    from conftest import streamlit_config

    config = streamlit_config()
    assert 1 <= config["server"]["maxUploadSize"] <= 500  # megabytes
