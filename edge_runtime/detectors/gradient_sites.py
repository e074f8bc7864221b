"""Where in the frozen classifier the per-sample cross-entropy gradient is taken.

Every site turns a batch and one chosen label per sample into a gradient vector [B, K] of fixed
length `dim`, so the Gaussian calibration and the scoring kernels never care which layer it was.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from edge_runtime.config import DetectorConfig
from edge_runtime.detectors.base import Observations
from edge_runtime.errors import ConfigError, InputError, StateError
from edge_runtime.models.base import FrozenClassifier
from kernels.reference import last_layer_gradients, penultimate_gradients

# A dense projection bigger than this (float32 elements, 1 GiB) would not fit an edge device.
MAX_PROJECTION_ELEMENTS = 2**28


class GradientSite(ABC):
    """Per-sample gradient of cross-entropy(f(x), label) w.r.t. one part of the classifier."""

    name: str = "site"
    dim: int

    @abstractmethod
    def gradients(self, batch: Observations, labels: torch.Tensor) -> torch.Tensor:
        """Gradient vectors [B, dim], in the dtype of the batch's features."""


class LastLinearSite(GradientSite):
    """Final linear layer's weight and bias, in closed form from features and logits (no autograd)."""

    name = "last_linear"

    def __init__(self, classifier: FrozenClassifier) -> None:
        self.dim = classifier.num_classes * (classifier.feature_dim + 1)

    def gradients(self, batch: Observations, labels: torch.Tensor) -> torch.Tensor:
        return last_layer_gradients(batch.features, batch.logits.softmax(dim=1), labels)


class PenultimateSite(GradientSite):
    """The final layer's input features: (softmax - onehot) @ W, a D-dim vector per sample."""

    name = "penultimate"

    def __init__(self, classifier: FrozenClassifier) -> None:
        self.weight = classifier.final_linear.weight.detach()
        self.dim = classifier.feature_dim

    def gradients(self, batch: Observations, labels: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(device=batch.logits.device, dtype=batch.logits.dtype)
        return penultimate_gradients(weight, batch.logits.softmax(dim=1), labels)


class LastConvSite(GradientSite):
    """Parameters of the last nn.Conv2d (registration order), per sample through torch.func.

    A conv layer can hold millions of parameters, so when it has more than `projection_dim` the
    gradient is multiplied by a fixed Gaussian matrix [P, projection_dim] / sqrt(projection_dim)
    (Johnson-Lindenstrauss: Mahalanobis geometry is roughly kept). The matrix is drawn on the CPU
    from `seed`, so it is the same on every device and need not be saved.
    """

    name = "last_conv"

    def __init__(self, classifier: FrozenClassifier, projection_dim: int, seed: int = 0) -> None:
        convs = [(name, m) for name, m in classifier.network.named_modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ConfigError("detector.site 'last_conv' needs a model with an nn.Conv2d; this classifier has none")
        layer_name, layer = convs[-1]
        self.network = classifier.network
        self.views = classifier.views  # the loss reads the image as the classifier does (mirror-averaged or not)
        self.layer_name = layer_name
        self.params = {f"{layer_name}.{key}": p.detach() for key, p in layer.named_parameters()}
        num_params = sum(p.numel() for p in self.params.values())
        self.dim = min(num_params, projection_dim)
        self._projection: torch.Tensor | None = None
        if num_params > projection_dim:
            if num_params * projection_dim > MAX_PROJECTION_ELEMENTS:
                raise ConfigError(
                    f"detector.projection_dim {projection_dim} x {num_params} parameters of conv {layer_name!r} "
                    f"exceeds {MAX_PROJECTION_ELEMENTS} projection entries; lower detector.projection_dim"
                )
            generator = torch.Generator().manual_seed(seed)
            self._projection = torch.randn(num_params, projection_dim, generator=generator) / projection_dim**0.5

    def gradients(self, batch: Observations, labels: torch.Tensor) -> torch.Tensor:
        if batch.images is None:
            raise InputError("detector.site 'last_conv' needs batch.images, but the Observations carry none")
        if self.network.training:
            raise StateError("the frozen classifier is in training mode; call .eval() before taking per-sample gradients")
        per_sample = vmap(grad(self._loss), in_dims=(None, 0, 0))(self.params, batch.images, labels)
        flat = torch.cat([per_sample[key].flatten(1) for key in self.params], dim=1).to(batch.features.dtype)
        if self._projection is None:
            return flat
        if self._projection.device != flat.device or self._projection.dtype != flat.dtype:
            self._projection = self._projection.to(device=flat.device, dtype=flat.dtype)
        return flat @ self._projection

    def _loss(self, params: dict[str, torch.Tensor], image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.network, params, (self.views(image.unsqueeze(0)),))
        return F.cross_entropy(logits.mean(dim=0, keepdim=True), label.unsqueeze(0))


def build_site(config: DetectorConfig, classifier: FrozenClassifier, seed: int = 0) -> GradientSite:
    """The site named by `detector.site`."""
    if config.site == "last_linear":
        return LastLinearSite(classifier)
    if config.site == "penultimate":
        return PenultimateSite(classifier)
    if config.site == "last_conv":
        return LastConvSite(classifier, config.projection_dim, seed)
    raise ConfigError(f"detector.site must be one of last_linear, penultimate, last_conv, got {config.site!r}")
