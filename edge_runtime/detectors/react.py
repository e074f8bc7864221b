"""ReAct (Sun et al., NeurIPS 2021): energy on penultimate activations clipped from above.

Novel inputs drive a few penultimate units abnormally high, and those units inflate the logits of
some known class; clipping every unit at a high percentile of the known activations removes that
excess while leaving known inputs, which rarely reach it, almost unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from edge_runtime.detectors.base import Detector, Observations, checked_features
from edge_runtime.errors import ConfigError, InputError, StateError
from edge_runtime.models.base import FrozenClassifier


class ReActDetector(Detector):
    """Score = -logsumexp(W min(a, c) + b), c the `percentile`-th percentile of the known activations."""

    name = "react"

    def __init__(self, classifier: FrozenClassifier, *, percentile: float = 90.0) -> None:
        super().__init__(classifier)
        if not 0.0 < percentile <= 100.0:
            raise ConfigError(f"react percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile
        self.clip: float | None = None

    def fit(self, known: Observations, labels: torch.Tensor) -> "ReActDetector":
        """The clipping level: one percentile over every unit of every known sample (labels unused)."""
        features = checked_features(known, self.classifier.feature_dim)
        if len(features) == 0:
            raise InputError("react: fit() needs at least one known sample")
        # numpy, because torch.quantile refuses inputs of more than 16M values (50,000 x 512 features).
        self.clip = float(np.percentile(features.cpu().double().numpy(), self.percentile))
        return self

    def clipped_logits(self, batch: Observations) -> torch.Tensor:
        """The logits [B, C] the final layer gives the clipped features."""
        if self.clip is None:
            raise StateError("react: score() called before fit()")
        features = checked_features(batch, self.classifier.feature_dim).float().clamp(max=self.clip)
        weight, bias = self.classifier.final_affine(torch.float32, features.device)
        return torch.nn.functional.linear(features, weight, bias)

    def score(self, batch: Observations) -> torch.Tensor:
        return -torch.logsumexp(self.clipped_logits(batch), dim=1)
