"""Energy score (Liu et al., 2020): logsumexp of the logits, which MSP's softmax normalises away."""

from __future__ import annotations

import torch

from edge_runtime.detectors.base import Detector, Observations
from edge_runtime.errors import ConfigError
from edge_runtime.models.base import FrozenClassifier


class EnergyDetector(Detector):
    """Score = -T * logsumexp(logits / T): the free energy, low for known inputs."""

    name = "energy"

    def __init__(self, classifier: FrozenClassifier, *, temperature: float = 1.0) -> None:
        super().__init__(classifier)
        if not temperature > 0:
            raise ConfigError(f"energy temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def fit(self, known: Observations, labels: torch.Tensor) -> "EnergyDetector":
        """Nothing to fit: the score is a fixed function of the logits."""
        return self

    def score(self, batch: Observations) -> torch.Tensor:
        return -self.temperature * torch.logsumexp(batch.logits.float() / self.temperature, dim=1)
