"""scikit-learn's 8x8 digits: the embedded default data set (nothing to download)."""

from __future__ import annotations

import numpy as np

from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.catalog import DIGIT_CLASSES
from edge_runtime.errors import DataError

TEST_FRACTION = 0.3
_SPLIT_SEED = 20240601  # fixed so 'train' and 'test' never overlap across runs


def load_digits_split(split: str) -> ImageSet:
    """A fixed stratified 70/30 train/test split of the 1,797 digits, as uint8 [N,8,8,1]."""
    if split not in ("train", "test"):
        raise DataError(f"digits has splits 'train' and 'test', not {split!r}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(_SPLIT_SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        members = np.flatnonzero(labels == c)
        is_test[rng.choice(members, size=round(len(members) * TEST_FRACTION), replace=False)] = True
    keep = is_test if split == "test" else ~is_test
    return ImageSet(images[keep], labels[keep], DIGIT_CLASSES, f"digits-{split}")
