"""Real photos that need no network: scikit-image's sample photos, read from the installed package.

scikit-image ships a few public-domain (CC0 or released) photographs inside its wheel. They serve
two jobs: a gallery of real photos for ImageNet models, each with its ImageNet class where one
clearly fits (a tabby cat, a cup of espresso), and a small built-in set of images to estimate the
statistics of taps no BatchNorm feeds (``batchnorm_statistics``). The files are read with Pillow
from the package's folder; scikit-image itself is never imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch
from PIL import Image

from .data import Preparation, fit_image, imagenet_classes


@dataclass(frozen=True)
class Photo:
    """One photo in scikit-image's data folder: its file, what it shows, its license, and its ImageNet
    class when one clearly fits (None: no ImageNet class names what it shows)."""

    file: str
    title: str
    license: str
    imagenet_class: str | None = None

    @property
    def path(self) -> Path:
        return _data_folder() / self.file

    @property
    def label(self) -> int | None:
        """The ImageNet label, or None."""
        return None if self.imagenet_class is None else imagenet_classes().index(self.imagenet_class)

    def image(self, size: tuple[int, int, int], preparation: Preparation | None = None) -> torch.Tensor:
        """The photo as a (C, H, W) model input in [0, 1]."""
        with Image.open(self.path) as image:
            return fit_image(image, size, preparation)


#: Only photos whose license scikit-image's ``skimage.data`` documents as CC0 or public domain.
PHOTOS: tuple[Photo, ...] = (
    Photo("chelsea.png", "Chelsea the cat", "CC0, photographer Stefan van der Walt", "tabby"),
    Photo("coffee.png", "a cup of espresso", "CC0, photographer Rachel Michetti", "espresso"),
    Photo("rocket.jpg", "Falcon 9 with DSCOVR on the launch pad", "public domain, SpaceX"),
    Photo("astronaut.png", "astronaut Eileen Collins", "public domain, NASA"),
    Photo("camera.png", "a photographer with a camera on a tripod (grey)", "CC0, photographer Lav Varshney"),
)


class PhotosUnavailable(RuntimeError):
    """scikit-image, which holds the built-in photos, is not installed."""


def _data_folder() -> Path:
    spec = find_spec("skimage")
    if spec is None or spec.origin is None:
        raise PhotosUnavailable("The built-in photos come with scikit-image, which is not installed: "
                                "pip install scikit-image.")
    return Path(spec.origin).parent / "data"


def available() -> bool:
    """Whether the built-in photos are on this machine."""
    try:
        return all(p.path.is_file() for p in PHOTOS)
    except PhotosUnavailable:
        return False


def builtin_photos(size: tuple[int, int, int], preparation: Preparation | None = None) -> torch.Tensor:
    """All the built-in photos as one (N, C, H, W) batch for a model's input ``size``."""
    return torch.stack([p.image(size, preparation) for p in PHOTOS])
