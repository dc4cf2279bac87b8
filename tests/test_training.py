"""The training recipe: images kept as uint8 and augmented on the device, resuming, the time limit."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from meansparse_core import training
from meansparse_core.data import FolderDataset, load_dataset, load_items
from meansparse_core.training import augment, train, training_images


def augment_one_by_one(images, generator, flip):
    """The recipe's augmentation as first written: one crop per image in a Python loop."""
    n, _, h, w = images.shape
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    crops = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        crops[mirrored] = crops[mirrored].flip(-1)
    return crops


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("shape", [(16, 3, 32, 32), (9, 1, 8, 8)])
def test_batched_augmentation_equals_the_per_image_loop(flip, shape, device):
    images = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ours, theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    got = augment(images.to(device), ours, flip)
    expected = augment_one_by_one(images.float() / 255, theirs, flip)
    assert got.device.type == device.type and got.dtype == torch.float32
    assert torch.equal(got.cpu(), expected)
    assert torch.equal(ours.get_state(), theirs.get_state()), "the same random draws, so seeded runs stay the same"


def test_training_images_are_the_split_as_uint8(tmp_path):
    digits = load_dataset("digits", "train")
    images, labels = training_images(digits, n=50, seed=3)
    floats, expected_labels = load_items(digits, training.sample_indices(len(digits), 50, 3))
    assert images.dtype == torch.uint8 and torch.equal(images.float() / 255, floats)
    assert torch.equal(labels, expected_labels)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    folder = FolderDataset(tmp_path, (3, 32, 32))
    images, labels = training_images(folder)
    floats, expected_labels = load_items(folder, range(len(folder)))
    assert torch.equal(images.float() / 255, floats) and torch.equal(labels, expected_labels)


def recipe(run_dir, **changes) -> argparse.Namespace:
    settings = dict(arch="digits-cnn", data="digits", data_dir=None, eps=32.0, attack_steps=1, step_size=None,
                    epochs=2, batch_size=32, lr=0.05, seed=0, device="cpu", run_dir=str(run_dir), amp=False,
                    train_n=64, time_limit=None)
    return argparse.Namespace(**{**settings, **changes})


def test_a_run_stopped_by_its_time_limit_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    straight = train(recipe(tmp_path / "straight"))
    clock = iter(range(0, 10**6, 100))  # every reading of the clock is 100 s later
    with monkeypatch.context() as patch:
        patch.setattr(training.time, "perf_counter", lambda: next(clock))
        assert train(recipe(tmp_path / "pieces", time_limit=250)) is None, "stopped before the second epoch"
    assert "stopped before epoch 2/2" in capsys.readouterr().err
    resumed = train(recipe(tmp_path / "pieces"))
    assert "resumed after epoch 1" in capsys.readouterr().err
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_mixed_precision_training_keeps_float32_weights(tmp_path):
    model = train(recipe(tmp_path, epochs=1, amp=True))
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training
