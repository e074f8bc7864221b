"""What the runtime knows about each named data set before reading a byte of it.

The config validator uses this to reject a held-out class that a data set does not have; the
loaders use it for default locations and for the hint printed when a data set is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The offline copies live beside the checkout; EDGE_RUNTIME_DATA points elsewhere (e.g. a carried copy).
SHARED_DATA = Path(os.environ.get("EDGE_RUNTIME_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a named data set."""

    name: str
    classes: tuple[str, ...] | None  # None: known only after reading (image folders, unlabeled sets)
    image_size: int
    channels: int
    default_path: Path | None
    how_to_get: str


CATALOG: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", DIGIT_CLASSES, 8, 1, None, "ships with scikit-learn (sklearn.datasets.load_digits)"),
    "cifar10": DatasetInfo(
        "cifar10", CIFAR10_CLASSES, 32, 3, SHARED_DATA / "cifar10-jpeg.tar.gz",
        "copy cifar10-jpeg.tar.gz (ImageFolder-shaped train/ and test/) there, or point data.path at a "
        "directory of that shape or at torchvision's cifar-10-batches-py",
    ),
    "mnist": DatasetInfo(
        "mnist", DIGIT_CLASSES, 28, 1, SHARED_DATA / "mnist-test.tar.gz",
        "copy mnist-test.tar.gz there, or point data.path at an ImageFolder directory or at torchvision's MNIST/raw IDX files",
    ),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", FASHION_CLASSES, 28, 1, Path("/usr/share/datasets/fashion-mnist"),
        "run `apt-get install dataset-fashion-mnist` (Debian), or point data.path at a folder holding the four IDX files",
    ),
    "tinyimagenet": DatasetInfo(
        "tinyimagenet", None, 64, 3, SHARED_DATA / "tinyimagenet-test.tar.gz",
        "copy tinyimagenet-test.tar.gz (test/unlabeled/*.JPEG) there, or point data.path at such a directory",
    ),
    "image_folder": DatasetInfo(
        "image_folder", None, 32, 3, None,
        "set data.path to a directory or .tar.gz laid out as split/class/image",
    ),
}
