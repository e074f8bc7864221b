"""One place that turns a detector name and its config into a detector object."""

from __future__ import annotations

from typing import Callable

import torch

from edge_runtime.config import DetectorConfig
from edge_runtime.detectors.base import Detector
from edge_runtime.detectors.energy import EnergyDetector
from edge_runtime.detectors.feature_mahalanobis import FeatureMahalanobisDetector
from edge_runtime.detectors.grad_mahalanobis import GradientMahalanobis
from edge_runtime.detectors.gradnorm import GradNormDetector
from edge_runtime.detectors.knn import KNNDetector
from edge_runtime.detectors.max_logit import MaxLogitDetector
from edge_runtime.detectors.msp import MSPDetector
from edge_runtime.detectors.pixel_registry import PIXEL_DETECTORS, build_pixel_detector
from edge_runtime.detectors.react import ReActDetector
from edge_runtime.detectors.vim import ViMDetector
from edge_runtime.models.base import FrozenClassifier

Builder = Callable[[FrozenClassifier, DetectorConfig, int], Detector]

# Detectors fitted once on known features and logits; the self-supervised one also adapts to a stream,
# and the pixel detectors (pixel_registry) train their own networks on known images.
STATIC_DETECTORS: dict[str, Builder] = {
    "msp": lambda clf, cfg, seed: MSPDetector(clf),
    "max_logit": lambda clf, cfg, seed: MaxLogitDetector(clf),
    "energy": lambda clf, cfg, seed: EnergyDetector(clf),
    "feature_mahalanobis": lambda clf, cfg, seed: FeatureMahalanobisDetector(clf, shrinkage=cfg.shrinkage, ridge=cfg.ridge),
    "knn": lambda clf, cfg, seed: KNNDetector(clf, k=cfg.knn_k),
    "react": lambda clf, cfg, seed: ReActDetector(clf, percentile=cfg.react_percentile),
    "vim": lambda clf, cfg, seed: ViMDetector(clf, dim=cfg.vim_dim),
    "gradnorm": lambda clf, cfg, seed: GradNormDetector(clf),
    "grad_mahalanobis": lambda clf, cfg, seed: GradientMahalanobis(clf, cfg, seed),
}


def build_static_detector(name: str, classifier: FrozenClassifier, config: DetectorConfig, seed: int = 0,
                          image_shape: tuple[int, int, int] | None = None, progress: bool = False,
                          device: torch.device | str | None = None) -> Detector:
    """A fresh, unfitted detector by name; pixel detectors (PIXEL_DETECTORS) also need `image_shape` (C, H, W)
    and train on `device` (None: where their inputs live)."""
    if name in PIXEL_DETECTORS:
        if image_shape is None:
            raise ValueError(f"detector {name!r} looks at pixels: it needs the image shape")
        return build_pixel_detector(name, config, image_shape, seed, progress, device)
    try:
        builder = STATIC_DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join([*STATIC_DETECTORS, *PIXEL_DETECTORS])}") from None
    return builder(classifier, config, seed)
