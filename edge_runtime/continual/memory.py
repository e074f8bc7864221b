"""Rehearsal memory: known-IDD samples kept under a hard sample budget.

The memory is the only labelled data the runtime holds after deployment, so it doubles as the
known-IDD reference for thresholds and as positives for the novelty head.
"""

from __future__ import annotations

import numpy as np

from edge_runtime.data.arrays import ImageSet

POLICIES = ("reservoir", "class_balanced")


class RehearsalMemory:
    """A fixed-budget store of labelled images filled by a selection policy.

    `reservoir` keeps a uniform sample of everything offered (Vitter's algorithm R);
    `class_balanced` keeps equal shares per class, evicting from the largest class first.
    """

    def __init__(self, budget: int, policy: str, image_shape: tuple[int, int, int], seed: int = 0) -> None:
        if budget <= 0:
            raise ValueError(f"memory budget must be positive, got {budget}")
        if policy not in POLICIES:
            raise ValueError(f"memory policy must be one of {POLICIES}, got {policy!r}")
        self.budget = budget
        self.policy = policy
        self.images = np.zeros((budget, *image_shape), dtype=np.uint8)
        self.labels = np.full(budget, -1, dtype=np.int64)
        self.size = 0
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Offer labelled samples; the policy decides which stay."""
        for image, label in zip(images, labels):
            slot = self._slot_for(int(label))
            self.seen += 1
            if slot is not None:
                self.images[slot] = image
                self.labels[slot] = label

    def _slot_for(self, label: int) -> int | None:
        if self.size < self.budget:
            self.size += 1
            return self.size - 1
        if self.policy == "reservoir":
            j = int(self._rng.integers(self.seen + 1))
            return j if j < self.budget else None
        counts = np.bincount(self.labels[: self.size], minlength=label + 1)
        largest = int(counts.argmax())
        if counts[label] >= counts[largest]:
            return None
        return int(self._rng.choice(np.flatnonzero(self.labels == largest)))

    def contents(self, classes: tuple[str, ...], name: str = "memory") -> ImageSet:
        """The stored samples as an ImageSet (a copy)."""
        return ImageSet(self.images[: self.size].copy(), self.labels[: self.size].copy(), classes, name)

    @property
    def nbytes(self) -> int:
        """Host bytes held by the stored samples and labels."""
        return self.images.nbytes + self.labels.nbytes
