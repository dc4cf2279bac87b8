"""The training recipes: images kept as uint8 and augmented on the device, resuming, the time limit, the
moving average of the weights, the held-out curve, the attack each recipe trains on."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from meansparse_core import training
from meansparse_core.data import FolderDataset, load_dataset, load_items
from meansparse_core import calibrate
from meansparse_core.architectures import build_architecture
from meansparse_core.training import (RECIPES, attack_step_size, augment, split_holdout, train, training_images,
                                      update_average, write_bundle)


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
                    train_n=64, time_limit=None, recipe="pgd-at", holdout=0)
    return argparse.Namespace(**{**settings, **changes})


@pytest.mark.parametrize("changes", [{}, {"recipe": "pgd-at-ema", "holdout": 16}])
def test_a_run_stopped_by_its_time_limit_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys, changes):
    straight = train(recipe(tmp_path / "straight", **changes))
    clock = iter(range(0, 10**6, 100))  # every reading of the clock is 100 s later
    with monkeypatch.context() as patch:
        patch.setattr(training.time, "perf_counter", lambda: next(clock))
        assert train(recipe(tmp_path / "pieces", time_limit=250, **changes)) is None, "stopped before the second epoch"
    assert "stopped before epoch 2/2" in capsys.readouterr().err
    resumed = train(recipe(tmp_path / "pieces", **changes))
    assert "resumed after epoch 1" in capsys.readouterr().err
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    strip = [{k: v for k, v in point.items() if k != "seconds"} for point in straight.curve]
    assert strip == [{k: v for k, v in point.items() if k != "seconds"} for point in resumed.curve]


def test_mixed_precision_training_keeps_float32_weights(tmp_path):
    model = train(recipe(tmp_path, epochs=1, amp=True))
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training


def test_the_averaged_recipe_ships_the_moving_average_of_the_weights(tmp_path):
    shipped = train(recipe(tmp_path, recipe="pgd-at-ema", epochs=1))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for key, value in shipped.state_dict().items():
        assert torch.equal(value, state["average"][key]), key
    floats = [k for k, v in state["model"].items() if v.is_floating_point()]
    assert any(not torch.equal(state["model"][k], state["average"][k]) for k in floats), "the average is not the raw"
    assert not shipped.training


def test_the_moving_average_moves_each_float_by_its_decay_and_copies_counters():
    average, model = build_architecture("digits-cnn"), build_architecture("digits-cnn")
    model.train()(torch.rand(4, 1, 8, 8))  # moves the BatchNorm buffers and their counters
    before = {k: v.clone() for k, v in average.state_dict().items()}
    update_average(average, model, 0.9)
    for key, value in average.state_dict().items():
        current = model.state_dict()[key]
        expected = 0.9 * before[key] + 0.1 * current if value.is_floating_point() else current
        assert torch.allclose(value, expected, atol=1e-7) if value.is_floating_point() else torch.equal(value, expected)


def test_a_seed_fixes_the_run_and_another_seed_changes_it(tmp_path):
    runs = [train(recipe(tmp_path / name, recipe="pgd-at-ema", holdout=16, seed=seed, epochs=1))
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    same = [all(torch.equal(value, run.state_dict()[key]) for key, value in runs[0].state_dict().items())
            for run in runs[1:]]
    assert same == [True, False]
    assert runs[0].curve[0]["held_out_average"] == runs[1].curve[0]["held_out_average"]


def test_the_schedule_runs_once_per_batch_over_the_images_left_after_the_holdout(tmp_path, monkeypatch):
    rates, step = [], training._train_step

    def recorded(model, optimizer, *rest):
        rates.append(optimizer.param_groups[0]["lr"])
        return step(model, optimizer, *rest)

    monkeypatch.setattr(training, "_train_step", recorded)
    train(recipe(tmp_path, recipe="pgd-at-ema", holdout=16, batch_size=20, epochs=4, lr=0.05))
    assert len(rates) == 4 * 3, "48 training images in batches of 20: 3 steps per epoch"
    assert rates[0] == pytest.approx(0.05 / 25) and max(rates) == pytest.approx(0.05, rel=0.01)
    assert rates[-1] == pytest.approx(0.05 / 25 / 1e4), "one-cycle's last batch runs at its floor"


def test_holdout_images_are_kept_out_and_no_holdout_keeps_the_order():
    images, labels = torch.arange(40).view(10, 4), torch.arange(10)
    kept_images, kept, held_images, held = split_holdout(images, labels, 3, seed=0)
    assert len(held) == 3 and sorted(kept.tolist() + held.tolist()) == list(range(10))
    assert torch.equal(kept_images, images[kept]) and torch.equal(held_images, images[held])
    kept_images, kept, _, held = split_holdout(images, labels, 0, seed=0)
    assert torch.equal(kept_images, images) and torch.equal(kept, labels) and len(held) == 0


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_crafts_its_attack_steps_in_its_batchnorm_mode(name, monkeypatch):
    args = recipe("unused", recipe=name, attack_steps=3)
    model = build_architecture("digits-cnn")
    modes = []
    model.register_forward_pre_hook(lambda module, inputs: modes.append(module.training))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    training._train_step(model, optimizer, torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)), args, seed=0)
    crafting = not RECIPES[name].craft_in_eval
    assert modes == [crafting] * 3 + [True], "3 attack steps, then one training pass in train mode"


def test_the_attack_step_is_the_flag_then_the_recipe_then_a_share_of_eps(tmp_path):
    assert attack_step_size(recipe(tmp_path, recipe="pgd-at-ema", eps=8, attack_steps=10)) == 2.0
    assert attack_step_size(recipe(tmp_path, recipe="pgd-at", eps=8, attack_steps=4)) == 2.5
    assert attack_step_size(recipe(tmp_path, recipe="pgd-at-ema", step_size=1.5)) == 1.5


def test_the_manifest_carries_the_held_out_curve(tmp_path):
    args = recipe(tmp_path, recipe="pgd-at-ema", holdout=16, epochs=1, out=str(tmp_path / "bundle"), label=None)
    write_bundle(train(args), args)
    manifest = json.loads((tmp_path / "bundle.json").read_text())
    point = manifest["curve"][0]
    assert point["epoch"] == 1 and set(point["held_out_raw"]) == set(point["held_out_average"]) == {"clean", "pgd10"}
    assert manifest["training"]["recipe"] == "pgd-at-ema" and manifest["training"]["holdout"] == 16


def test_the_preact_resnet18_fits_25_mb_in_fp16_with_a_tap_before_each_relu():
    model = build_architecture("cifar-preact-resnet18").eval()
    floats = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    assert 2 * floats <= 25_000_000
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    stats = calibrate(model, [torch.rand(4, 3, 32, 32)])
    assert len(stats.tap_list) == len(relus) == 17
