"""One place that turns a detector name and its config into a detector object."""

from __future__ import annotations

from typing import Callable

from edge_runtime.config import DetectorConfig
from edge_runtime.detectors.base import Detector
from edge_runtime.detectors.energy import EnergyDetector
from edge_runtime.detectors.feature_mahalanobis import FeatureMahalanobisDetector
from edge_runtime.detectors.grad_mahalanobis import GradientMahalanobis
from edge_runtime.detectors.knn import KNNDetector
from edge_runtime.detectors.msp import MSPDetector
from edge_runtime.models.base import FrozenClassifier

Builder = Callable[[FrozenClassifier, DetectorConfig, int], Detector]

# Detectors fitted once on known training data; the self-supervised one also adapts to a stream.
STATIC_DETECTORS: dict[str, Builder] = {
    "msp": lambda clf, cfg, seed: MSPDetector(clf),
    "energy": lambda clf, cfg, seed: EnergyDetector(clf),
    "feature_mahalanobis": lambda clf, cfg, seed: FeatureMahalanobisDetector(clf, shrinkage=cfg.shrinkage, ridge=cfg.ridge),
    "knn": lambda clf, cfg, seed: KNNDetector(clf, k=cfg.knn_k),
    "grad_mahalanobis": lambda clf, cfg, seed: GradientMahalanobis(clf, cfg, seed),
}


def build_static_detector(name: str, classifier: FrozenClassifier, config: DetectorConfig, seed: int = 0) -> Detector:
    """A fresh, unfitted detector by name."""
    try:
        builder = STATIC_DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(STATIC_DETECTORS)}") from None
    return builder(classifier, config, seed)
