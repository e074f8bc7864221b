"""Feature Mahalanobis (Lee et al., 2018): class-conditional Gaussians on penultimate features."""

from __future__ import annotations

import torch

from calibration.gaussian import TiedGaussian, fit_tied_gaussian
from calibration.moments import ClassMoments
from edge_runtime.detectors.base import Detector, Observations, checked_features
from edge_runtime.errors import StateError
from edge_runtime.models.base import FrozenClassifier


class FeatureMahalanobisDetector(Detector):
    """Score = min over classes of the tied-covariance Mahalanobis distance of the features."""

    name = "feature_mahalanobis"

    def __init__(self, classifier: FrozenClassifier, *, shrinkage: str = "ledoit_wolf", ridge: float = 1e-3) -> None:
        super().__init__(classifier)
        self.shrinkage = shrinkage
        self.ridge = ridge
        self.gaussian: TiedGaussian | None = None

    def fit(self, known: Observations, labels: torch.Tensor) -> "FeatureMahalanobisDetector":
        features = checked_features(known, self.classifier.feature_dim)
        moments = ClassMoments(
            self.classifier.num_classes, features.shape[1], features.device,
            fourth_moments=self.shrinkage == "ledoit_wolf",
        )
        moments.update(features, labels)
        self.gaussian = fit_tied_gaussian(moments, self.shrinkage, self.ridge)
        return self

    def score(self, batch: Observations) -> torch.Tensor:
        if self.gaussian is None:
            raise StateError("feature_mahalanobis: score() called before fit()")
        distances, _closest = self.gaussian.min_score(checked_features(batch, self.gaussian.dim))
        return distances

