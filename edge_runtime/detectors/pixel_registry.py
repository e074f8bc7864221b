"""Builds the detectors that look at pixels and train their own networks (vae_gradient, drocc, drocc_lf, rotation).

They need the image geometry instead of a frozen classifier, so they have their own builder, which
`registry.build_static_detector` calls for the names in PIXEL_DETECTORS.
"""

from __future__ import annotations

import torch

from edge_runtime.config import DetectorConfig
from edge_runtime.detectors.drocc import DROCCDetector
from edge_runtime.detectors.pixel_base import PixelDetector
from edge_runtime.detectors.rotation import RotationDetector
from edge_runtime.detectors.vae_gradient import VAEGradientDetector
from edge_runtime.errors import ConfigError

PIXEL_DETECTORS = ("vae_gradient", "drocc", "drocc_lf", "rotation")


def build_pixel_detector(name: str, config: DetectorConfig, image_shape: tuple[int, int, int], seed: int = 0,
                         progress: bool = False, device: torch.device | str | None = None) -> PixelDetector:
    """A fresh, unfitted pixel detector for images of `image_shape` (C, H, W), training on `device`
    (None: wherever the images it is given live)."""
    if len(image_shape) != 3:
        raise ConfigError(f"image_shape must be (channels, height, width), got {image_shape!r}")
    if name == "vae_gradient":
        return VAEGradientDetector(image_shape, config.vae, seed, progress, device)
    if name in ("drocc", "drocc_lf"):
        return DROCCDetector(image_shape, config.drocc, name, seed, progress, device)
    if name == "rotation":
        return RotationDetector(image_shape, config.rotation, seed, progress, device)
    raise ConfigError(f"detector.name {name!r} is not a pixel detector; pixel detectors: {', '.join(PIXEL_DETECTORS)}")
