"""The uniform surface every novelty detector offers: fit on known-IDD data, then score."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from edge_runtime.errors import InputError
from edge_runtime.models.base import FrozenClassifier

PROTOCOLS = ("per_sample", "homogeneous_batches")


@dataclass(frozen=True)
class Observations:
    """What the frozen classifier saw and produced for one batch.

    images are [0,1] NCHW (kept for detectors that look at pixels, e.g. the paper's binary
    classifier); features [B, D] and logits [B, C] come from `FrozenClassifier.embed`; stats
    [B, S] are the per-channel layer statistics of `FrozenClassifier.embed_with_stats`, kept for
    heads configured with `layer_stats`.
    """

    images: torch.Tensor | None
    features: torch.Tensor
    logits: torch.Tensor
    stats: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.features)

    def select(self, index: torch.Tensor) -> "Observations":
        images = None if self.images is None else self.images[index]
        stats = None if self.stats is None else self.stats[index]
        return Observations(images, self.features[index], self.logits[index], stats)

    @staticmethod
    def concat(parts: "list[Observations]") -> "Observations":
        images = None if any(p.images is None for p in parts) else torch.cat([p.images for p in parts])
        stats = None if any(p.stats is None for p in parts) else torch.cat([p.stats for p in parts])
        return Observations(images, torch.cat([p.features for p in parts]), torch.cat([p.logits for p in parts]), stats)


def checked_features(batch: Observations, dim: int) -> torch.Tensor:
    """`batch.features`, refused with a message naming the shape unless it is [B, dim]."""
    if batch.features.ndim != 2 or batch.features.shape[1] != dim:
        raise InputError(f"features must be [B, {dim}], got {tuple(batch.features.shape)}")
    return batch.features


class Detector(ABC):
    """A novelty detector: higher scores mean more likely novel (OOD).

    `fit` sees only known-IDD data with its labels (training or rehearsal memory). Detectors that
    learn from the unlabeled stream also implement `observe`.
    """

    name: str = "detector"
    # Whether a refit on more of the same data scores on the scale of the first fit. False for
    # networks whose output scale is set by each training run (DROCC's logits): a threshold read
    # from cross-fitted models then only holds for those models (continual.learner.StaticHead).
    refit_keeps_score_scale: bool = True

    def __init__(self, classifier: FrozenClassifier) -> None:
        self.classifier = classifier

    @abstractmethod
    def fit(self, known: Observations, labels: torch.Tensor) -> "Detector":
        """Fit IDD statistics from known data; returns self."""

    @abstractmethod
    def score(self, batch: Observations) -> torch.Tensor:
        """Novelty score [B] (float32); higher = more novel."""

    def score_protocol(self, batch: Observations, protocol: str) -> torch.Tensor:
        """Score under an evaluation protocol (see DESIGN.md).

        Detectors whose decision uses batch statistics override this; for the rest every input is
        scored alone, so both protocols give the same numbers.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        return self.score(batch)

    def observe(self, batch: Observations) -> None:
        """Learn from an unlabeled stream batch; stateless detectors ignore it."""
