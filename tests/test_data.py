"""Data sources: the offline default, CIFAR in both local layouts, sampling, downloads (uploads: test_bad_uploads.py)."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meansparse_core.data import (DataUnavailable, download, load_dataset, load_items,
                                  sample_indices)



def test_offline_digits_need_no_download_and_split_deterministically():
    test, train = load_dataset("digits", "test"), load_dataset("digits", "train")
    assert (len(test), len(train)) == (500, 1297)
    image, label = test[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.5
    assert set(train.labels) == set(range(10)) and test.classes == [str(d) for d in range(10)]
    assert load_dataset("digits", "test").labels == test.labels


def test_sampling_is_deterministic_distinct_and_bounded():
    a, b = sample_indices(1000, 50, seed=3), sample_indices(1000, 50, seed=3)
    assert a == b and len(set(a)) == 50 and max(a) < 1000
    assert sample_indices(1000, 50, seed=4) != a
    assert sorted(sample_indices(10, 99, seed=0)) == list(range(10))


# Official layouts: folder, (train file, test file), label key, names file, names key.
OFFICIAL = {
    "cifar10": ("cifar-10-batches-py", ("data_batch_1", "test_batch"), b"labels", "batches.meta", b"label_names"),
    "cifar100": ("cifar-100-python", ("train", "test"), b"fine_labels", "meta", b"fine_label_names"),
}


def _write_official_batches(root: Path, dataset: str, n: int = 7) -> np.ndarray:
    """Files in the official CIFAR python layout, made from random pixels."""
    folder_name, files, label_key, names_file, names_key = OFFICIAL[dataset]
    folder = root / folder_name
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    for name in files:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": pixels, label_key: list(range(n))}, f)
    with open(folder / names_file, "wb") as f:
        pickle.dump({names_key: [f"c{i}".encode() for i in range(100)]}, f)
    return pixels


@pytest.mark.parametrize("dataset", OFFICIAL)
def test_cifar_official_python_batches(tmp_path, dataset):
    pixels = _write_official_batches(tmp_path, dataset)
    for split in ["train", "test"]:
        data = load_dataset(dataset, split, root=tmp_path)
        assert len(data) == 7 and data.classes[3] == "c3"
        image, label = data[2]
        assert label == 2
        assert torch.equal(image, torch.from_numpy(pixels[2].reshape(3, 32, 32)).float() / 255)


def test_cifar_imagefolder_tree(tmp_path):
    for split in ["train", "test"]:
        for cls in ["airplane", "cat"]:
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            Image.new("RGB", (32, 32), (255, 0, 0) if cls == "cat" else (0, 0, 255)).save(folder / "0.png")
    test = load_dataset("cifar10", "test", root=tmp_path)
    images, labels = load_items(test, [0, 1])
    assert test.classes == ["airplane", "cat"] and labels.tolist() == [0, 1]
    assert images.shape == (2, 3, 32, 32) and images[1, 0].mean() == 1.0 and images[0, 2].mean() == 1.0


def test_cifar10_from_the_shared_jpeg_archive(shared_cifar10):
    test = load_dataset("cifar10", "test", root=shared_cifar10)
    assert len(test) == 10_000 and test.classes[0] == "airplane" and test.classes[-1] == "truck"
    images, labels = load_items(test, sample_indices(len(test), 200, seed=0))
    means = images.mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.tensor([0.494, 0.485, 0.450]), atol=0.03)
    assert len(set(labels.tolist())) == 10


def test_unknown_dataset_and_split_are_refused():
    with pytest.raises(KeyError, match="Unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "valid")


def test_download_writes_the_file_checks_its_md5_and_reports_progress(file_server, tmp_path):
    import hashlib

    folder, url = file_server
    payload = bytes(range(256)) * 5000
    (folder / "blob.bin").write_bytes(payload)
    calls = []
    dest = download(f"{url}/blob.bin", tmp_path / "out" / "blob.bin", hashlib.md5(payload).hexdigest(),
                    progress=lambda done, total: calls.append((done, total)))
    assert dest.read_bytes() == payload and calls[-1] == (len(payload), len(payload))
    with pytest.raises(DataUnavailable, match="corrupted"):
        download(f"{url}/blob.bin", tmp_path / "bad.bin", md5="0" * 32)
    assert not (tmp_path / "bad.bin").exists()


def test_imagenet_validation_folder(tmp_path):
    for wnid in ["n01440764", "n01443537"]:
        folder = tmp_path / "val" / wnid
        folder.mkdir(parents=True)
        Image.new("RGB", (500, 375), (10, 200, 30)).save(folder / "a.JPEG")
    val = load_dataset("imagenet", "test", root=tmp_path)
    image, label = val[1]
    assert val.classes == ["n01440764", "n01443537"] and label == 1 and image.shape == (3, 224, 224)
