"""GradNorm (Huang et al., NeurIPS 2021): the gradient-based per-sample baseline.

The KL divergence from the uniform distribution to the softmax is back-propagated to the final
layer's weights, and the L1 norm of that gradient is large for known inputs (a confident softmax
is far from uniform) and small for novel ones. For one sample the weight gradient is the outer
product (softmax(z / T) - 1/C) / T  x  a, so its L1 norm factorises into
||softmax(z / T) - 1/C||_1 * ||a||_1 / T: no backward pass and no B x K matrix.
"""

from __future__ import annotations

import torch

from edge_runtime.detectors.base import Detector, Observations, checked_features
from edge_runtime.errors import ConfigError
from edge_runtime.models.base import FrozenClassifier


class GradNormDetector(Detector):
    """Score = -||d KL(u || softmax(z / T)) / dW||_1 over the final layer's weights W."""

    name = "gradnorm"

    def __init__(self, classifier: FrozenClassifier, *, temperature: float = 1.0) -> None:
        super().__init__(classifier)
        if not temperature > 0:
            raise ConfigError(f"gradnorm temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def fit(self, known: Observations, labels: torch.Tensor) -> "GradNormDetector":
        """Nothing to fit: the score is a fixed function of features and logits."""
        return self

    def score(self, batch: Observations) -> torch.Tensor:
        features = checked_features(batch, self.classifier.feature_dim).float()
        logits = batch.logits.float()
        uniform = 1.0 / logits.shape[1]
        output_grad = (logits / self.temperature).softmax(dim=1) - uniform
        return -output_grad.abs().sum(dim=1) * features.abs().sum(dim=1) / self.temperature
