"""Data sources: one registry of labelled image sets, plus single uploaded images.

Every dataset yields ``(image, label)`` with ``image`` a float32 tensor in [0, 1], shaped
(C, H, W) as the matching models expect; normalisation belongs to the model. Sources:

- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images), shipped inside the installed
  scikit-learn package, so it works with no network and no download at all;
- ``cifar10`` / ``cifar100``: a local folder holding the official python batches or an
  ImageFolder tree (``train/<class>/*.jpg``, ``test/<class>/*.jpg``), else a download;
- ``imagenet``: a local ImageFolder tree of the validation set (``val/<wnid>/*.JPEG``).

Every source knows its class names without loading any data (ImageNet's 1,000 come from
torchvision's weights metadata, which ships inside the installed package). Photos of any size are
fitted to a model by a ``Preparation``: the short side resized, then a centred crop.

Example::

    test_set = load_dataset("cifar10", "test", root="~/data")
    images, labels = load_items(test_set, sample_indices(len(test_set), n=100, seed=0))
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import threading
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from .class_names import CIFAR10_CLASSES, CIFAR100_CLASSES, imagenet_classes
from .files import atomic_write
from .paths import data_root

DOWNLOAD_TIMEOUT_S = 15
Progress = Callable[[int, int], None]


class DataUnavailable(RuntimeError):
    """The data is neither on disk nor downloadable; the message says what to put where."""


class ArrayDataset(Dataset):
    """Images held in memory as uint8 (N, H, W, C), converted to [0, 1] tensors on access."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], classes: Sequence[str]) -> None:
        self.images = images
        self.labels = [int(y) for y in labels]
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, index: int) -> int:
        return self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)
        return image.float().div_(255), self.labels[index]


class FolderDataset(Dataset):
    """An ImageFolder tree (``<root>/<class>/<image>``), decoded and fitted to ``size`` on access."""

    EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

    def __init__(self, root: Path, size: tuple[int, int, int], preparation: Preparation | None = None) -> None:
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).iterdir())
            if path.suffix.lower() in self.EXTENSIONS
        ]
        self.size = size
        self.preparation = preparation or Preparation()

    def __len__(self) -> int:
        return len(self.samples)

    def label(self, index: int) -> int:
        """The label alone, without decoding the image."""
        return self.samples[index][1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            return fit_image(image, self.size, self.preparation), label


@dataclass(frozen=True)
class Preparation:
    """How an image of any size and shape becomes a model input: the short side is resized to
    ``resize`` pixels (None: just enough to cover the input), then the centre is cropped to the
    input's size. ImageNet's ``Preparation(256, "bilinear")`` is RobustBench's ``Res256Crop224``."""

    resize: int | None = None
    interpolation: str = "bicubic"  # "bilinear" or "bicubic"

    def short_side(self, size: tuple[int, int, int]) -> int:
        return self.resize or max(size[1:])

    def describe(self, size: tuple[int, int, int]) -> str:
        return (f"short side resized to {self.short_side(size)} px ({self.interpolation}), "
                f"centre {size[2]}x{size[1]} crop")

    def __call__(self, image: Image.Image, size: tuple[int, int, int]) -> Image.Image:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as tf

        height, width = size[1:]
        if image.size != (width, height):
            image = tf.resize(image, [self.short_side(size)], InterpolationMode(self.interpolation))
            image = tf.center_crop(image, [height, width])
        return image


def fit_image(image: Image.Image, size: tuple[int, int, int], preparation: Preparation | None = None) -> torch.Tensor:
    """Any PIL image as a (C, H, W) tensor in [0, 1]: upright (EXIF orientation), C channels, prepared
    by ``preparation`` (default: short side resized to cover H x W, centre crop)."""
    channels, height, width = size
    image = ImageOps.exif_transpose(image)
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit grey (PNG, TIFF): scale to 8 bits; convert() would clip every tone above 255 to white.
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    if image.mode in ("P", "LA", "PA", "RGBA") or "transparency" in image.info:
        # Transparent pixels over white, as an image viewer shows them.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    image = (preparation or Preparation())(image.convert("RGB" if channels == 3 else "L"), size)
    array = np.asarray(image, dtype=np.uint8).reshape(height, width, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def load_image(data: bytes, size: tuple[int, int, int], max_pixels: int = 40_000_000,
               preparation: Preparation | None = None) -> torch.Tensor:
    """An uploaded image file (PNG, JPEG, WebP, ...) of any size as a model input; ValueError if unusable."""
    preparation = preparation or Preparation()
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise ValueError(
                    f"The image is {image.width}x{image.height} pixels; upload one under "
                    f"{max_pixels // 1_000_000} megapixels."
                )
            # A JPEG photo decodes at 1/2, 1/4 or 1/8 scale when that still covers the model's
            # input: a 12-megapixel photo then costs a fraction of the time and memory.
            side = preparation.short_side(size)
            image.draft(None, (side, side))
            image.load()
            return fit_image(image, size, preparation)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"The image has too many pixels to open safely; upload one under "
                         f"{max_pixels // 1_000_000} megapixels.") from exc
    except UnidentifiedImageError as exc:
        raise ValueError("This file could not be read as an image; upload a PNG, JPEG or WebP.") from exc
    except (OSError, SyntaxError) as exc:  # truncated or damaged files
        raise ValueError(f"This file is damaged or incomplete and could not be read as an image ({exc}); "
                         "upload another copy.") from exc


def folder_photos(root: str | os.PathLike, size: tuple[int, int, int], preparation: Preparation | None = None,
                  max_pixels: int = 40_000_000) -> torch.Tensor:
    """Every image under ``root``, at any depth and with no labels, as one (N, C, H, W) batch fitted to
    ``size``; DataUnavailable when there is none. Unreadable files are refused by name (ValueError)."""
    root = Path(root).expanduser()
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in FolderDataset.EXTENSIONS and p.is_file()) \
        if root.is_dir() else []
    if not files:
        raise DataUnavailable(f"No photos (PNG, JPEG, WebP, BMP) in {root}: put some there, at any depth.")
    images = []
    for path in files:
        try:
            images.append(load_image(path.read_bytes(), size, max_pixels, preparation))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    return torch.stack(images)


# --- sources -------------------------------------------------------------------------------


def _digits(split: str, root: Path | None, progress: Progress | None, fetch: bool) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    # A fixed split: 500 test images, the rest for training; same on every machine.
    order = np.random.default_rng(0).permutation(len(images))
    chosen = order[:500] if split == "test" else order[500:]
    return ArrayDataset(images[chosen], digits.target[chosen], [str(d) for d in range(10)])


@dataclass(frozen=True)
class _Cifar:
    folder: str  # inside the official archive
    train_files: str  # glob of the training batches in that folder
    test_files: str
    url: str
    md5: str
    label_key: bytes
    names_file: str
    names_key: bytes

    def __call__(self, split: str, root: Path | None, progress: Progress | None, fetch: bool) -> Dataset:
        root = Path(root or data_root()).expanduser()
        for candidate in (root / split, root / "cifar10-jpeg" / split, root / "cifar100-jpeg" / split):
            if candidate.is_dir():
                return FolderDataset(candidate, (3, 32, 32))
        batches = root if (root / self.names_file).exists() else root / self.folder
        if not (batches / self.names_file).exists():
            if not fetch:
                raise DataUnavailable(f"No {self.folder} in {root}; download it or point the data folder at a copy.")
            extract(download(self.url, root / Path(self.url).name, self.md5, progress), root)
            batches = root / self.folder
        return self._read_batches(batches, split)

    def _read_batches(self, folder: Path, split: str) -> ArrayDataset:
        files = sorted(folder.glob(self.test_files if split == "test" else self.train_files))
        images, labels = [], []
        for file in files:
            with open(file, "rb") as f:
                # The official CIFAR batches are pickles of arrays and lists; they carry no code.
                batch = pickle.load(f, encoding="bytes")
            images.append(batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(batch[self.label_key])
        with open(folder / self.names_file, "rb") as f:
            names = [n.decode() for n in pickle.load(f, encoding="bytes")[self.names_key]]
        return ArrayDataset(np.concatenate(images), labels, names)


def _imagenet(split: str, root: Path | None, progress: Progress | None, fetch: bool) -> Dataset:
    root = Path(root or data_root() / "imagenet").expanduser()
    folder = root / "val" if (root / "val").is_dir() else root
    if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
        raise DataUnavailable(
            f"No ImageNet validation images in {folder}: put them there as val/<wnid>/<image>.JPEG "
            "(ImageNet cannot be downloaded automatically)."
        )
    return FolderDataset(folder, (3, 224, 224), IMAGENET_PREPARATION)


# --- the registry ------------------------------------------------------------------------------

#: RobustBench's ``Res256Crop224``: short side to 256 pixels (bilinear), centre 224x224 crop.
IMAGENET_PREPARATION = Preparation(256, "bilinear")


@dataclass(frozen=True)
class DataSource:
    """A labelled image set: how to get it and what its images look like."""

    key: str
    label: str
    num_classes: int
    image_size: tuple[int, int, int]
    load: Callable[[str, Path | None, Progress | None, bool], Dataset]  # (split, root, progress, fetch)
    names: Callable[[], Sequence[str]]  # the class names, known without loading any data
    linf_eps: float = 8.0  # the usual Linf budget for this data, in /255 (RobustBench's for its datasets)
    preparation: Preparation = Preparation()  # how a photo of any size becomes one of its images

    @cached_property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.names())


DATASETS: dict[str, DataSource] = {
    source.key: source
    for source in [
        DataSource("digits", "Digits 8x8 (offline, ships with scikit-learn)", 10, (1, 8, 8), _digits,
                   lambda: [str(d) for d in range(10)], linf_eps=32.0),
        DataSource(
            "cifar10", "CIFAR-10", 10, (3, 32, 32),
            _Cifar("cifar-10-batches-py", "data_batch_*", "test_batch", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                   "c58f30108f718f92721af3b95e74349a", b"labels", "batches.meta", b"label_names"),
            lambda: CIFAR10_CLASSES,
        ),
        DataSource(
            "cifar100", "CIFAR-100", 100, (3, 32, 32),
            _Cifar("cifar-100-python", "train", "test", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                   "eb9058c3a382ffc7106e4002c42a8d85", b"fine_labels", "meta", b"fine_label_names"),
            lambda: CIFAR100_CLASSES,
        ),
        DataSource("imagenet", "ImageNet (local validation folder)", 1000, (3, 224, 224), _imagenet,
                   imagenet_classes, linf_eps=4.0, preparation=IMAGENET_PREPARATION),
    ]
}


def load_dataset(key: str, split: str = "test", root: str | os.PathLike | None = None,
                 progress: Progress | None = None, fetch: bool = True) -> Dataset:
    """The ``split`` ("train" or "test") of data source ``key``, from ``root`` or downloaded.

    With ``fetch=False`` nothing is downloaded: DataUnavailable when the data is not on disk.
    """
    if key not in DATASETS:
        raise KeyError(f"Unknown dataset {key!r}; choose one of {', '.join(DATASETS)}.")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    return DATASETS[key].load(split, Path(root) if root else None, progress, fetch)


def sample_indices(total: int, n: int, seed: int) -> list[int]:
    """``n`` distinct indices out of ``total``, the same for the same seed on every machine."""
    n = min(n, total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def load_items(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the chosen items into an image batch and a label vector."""
    items = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


class ItemBatches(Sequence[torch.Tensor]):
    """The images of ``dataset`` at ``indices`` in batches of ``size``, each read when it is asked for.

    Calibration walks it batch by batch, so the whole set never sits in memory at once, and under
    torchrun each rank reads only its own share of the batches (see ``statistics.calibrate``).
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], size: int) -> None:
        self.dataset, self.indices, self.size = dataset, list(indices), size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.size)

    def __getitem__(self, k: int) -> torch.Tensor:
        if not 0 <= k < len(self):
            raise IndexError(f"batch {k} of {len(self)}")
        return load_items(self.dataset, self.indices[k * self.size:(k + 1) * self.size])[0]


def item_labels(dataset: Dataset, indices: Sequence[int]) -> torch.Tensor:
    """The labels of the items at ``indices``, without decoding their images where the dataset allows."""
    label = getattr(dataset, "label", None) or (lambda i: dataset[i][1])
    return torch.tensor([label(i) for i in indices], dtype=torch.long)


class LazyImages:
    """The images of ``dataset`` at ``indices``, indexed like a tensor of them (by a slice, or a tensor
    of positions) but each read when first indexed and then kept.

    ``evaluation.evaluate`` takes it in place of an image tensor: under torchrun each rank reads only
    the items it predicts and attacks, not all N.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.dataset, self.indices, self.device = dataset, list(indices), torch.device(device)
        self._read: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: slice | torch.Tensor) -> torch.Tensor:
        positions = range(len(self))[key] if isinstance(key, slice) else key.tolist()
        if not positions:
            return torch.zeros(0, device=self.device)
        for p in positions:
            if p not in self._read:
                self._read[p] = self.dataset[self.indices[p]][0]
        return torch.stack([self._read[p] for p in positions]).to(self.device)


def _connect(url: str, timeout: float):
    """``urlopen`` with ``timeout`` on the whole connection, name lookup included.

    urllib's own timeout covers socket operations only; a name lookup with no network can hang far
    longer, so the connection is made in a daemon thread that is abandoned after ``timeout``.
    """
    outcome: dict = {}

    def connect() -> None:
        try:
            outcome["response"] = urllib.request.urlopen(url, timeout=timeout)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=connect, name="meansparse-download", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no connection within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["response"]


def download(url: str, dest: Path, md5: str | None = None, progress: Progress | None = None,
             timeout: float | None = None) -> Path:
    """Fetch ``url`` to ``dest`` atomically; DataUnavailable (naming ``dest``) when it cannot.

    Fails within ``timeout`` seconds (default ``DOWNLOAD_TIMEOUT_S``) when there is no network,
    and when a server stops sending for that long; it never retries.
    """
    dest = Path(dest)
    timeout = DOWNLOAD_TIMEOUT_S if timeout is None else timeout

    def fetch(out) -> None:
        with _connect(url, timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            digest, done = hashlib.md5(), 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, max(total, done))
        if md5 is not None and digest.hexdigest() != md5:
            raise DataUnavailable(f"The download of {url} was corrupted; put the file at {dest} by hand.")

    try:
        return atomic_write(dest, fetch)
    except (OSError, ValueError) as exc:
        raise DataUnavailable(
            f"Could not download {url} ({exc}); with no network, put that file at {dest} "
            f"or point the data folder at a copy you already have."
        ) from exc


def extract(archive: Path, dest: Path) -> Path:
    """Unpack a tar archive into ``dest`` (used for local archives such as cifar10-jpeg.tar.gz)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest

