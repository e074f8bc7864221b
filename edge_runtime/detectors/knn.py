"""Deep nearest neighbours (Sun et al., 2022): distance to the k-th closest known feature."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_runtime.detectors.base import Detector, Observations, checked_features
from edge_runtime.errors import ConfigError, StateError
from edge_runtime.models.base import FrozenClassifier


class KNNDetector(Detector):
    """Score = L2 distance from the normalised feature to its k-th nearest normalised known feature.

    Distances are computed for `chunk_size` queries at a time, so memory stays at
    chunk_size x (number of known samples) however large the scored batch is.
    """

    name = "knn"

    def __init__(self, classifier: FrozenClassifier, *, k: int = 50, chunk_size: int = 512) -> None:
        super().__init__(classifier)
        if k < 1 or chunk_size < 1:
            raise ConfigError(f"knn k and chunk_size must be >= 1, got k={k}, chunk_size={chunk_size}")
        self.k = k
        self.chunk_size = chunk_size
        self.bank: torch.Tensor | None = None

    def fit(self, known: Observations, labels: torch.Tensor) -> "KNNDetector":
        """Keep the normalised known features; labels are not used by this detector."""
        if len(known) < self.k:
            raise ConfigError(f"knn k={self.k} exceeds the {len(known)} known samples it was fitted on")
        self.bank = _normalised(known, self.classifier.feature_dim)
        return self

    def score(self, batch: Observations) -> torch.Tensor:
        if self.bank is None:
            raise StateError("knn: score() called before fit()")
        queries = _normalised(batch, self.bank.shape[1]).to(self.bank.device)
        kth = [
            torch.cdist(chunk, self.bank).topk(self.k, dim=1, largest=False).values[:, -1]
            for chunk in queries.split(self.chunk_size)
        ]
        return torch.cat(kth) if kth else queries.new_zeros(0)


def _normalised(batch: Observations, dim: int) -> torch.Tensor:
    return F.normalize(checked_features(batch, dim).float(), dim=1)
