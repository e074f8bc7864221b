"""Maximum softmax probability (Hendrycks & Gimpel, 2017): the classic per-sample baseline."""

from __future__ import annotations

import torch

from edge_runtime.detectors.base import Detector, Observations


class MSPDetector(Detector):
    """Score = -max_c softmax(logits)_c: a confident prediction means a known input."""

    name = "msp"

    def fit(self, known: Observations, labels: torch.Tensor) -> "MSPDetector":
        """Nothing to fit: the frozen classifier's confidence is the whole detector."""
        return self

    def score(self, batch: Observations) -> torch.Tensor:
        return -batch.logits.float().softmax(dim=1).amax(dim=1)
