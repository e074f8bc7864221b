"""The one in-memory form every loader returns: uint8 images with integer labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNLABELED = -1


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 [N, H, W, C] with int64 labels [N] (UNLABELED where unknown).

    Kept as numpy so data sets cache to disk as plain arrays and stay framework-neutral until a
    batch is handed to a model.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be uint8 [N,H,W,C], got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"{self.name}: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray, name: str | None = None) -> "ImageSet":
        """The images at `index` (an index array or boolean mask), same classes."""
        return ImageSet(self.images[index], self.labels[index], self.classes, name or self.name)
