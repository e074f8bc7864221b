"""What the detectors that read pixels and train their own networks share (vae_gradient, drocc).

They never consult the frozen classifier. They train and score on a compute device of their
own (the GPU the session's classifier uses, say) while the runtime keeps its observations on the
host, so pixels move there on the way in and scores come back to the caller's device.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from edge_runtime.detectors.base import Detector, Observations
from edge_runtime.errors import InputError, StateError


class PixelDetector(Detector):
    """Fit on known images ([0,1] NCHW in `Observations.images`) as one inlier distribution."""

    def __init__(self, image_shape: tuple[int, int, int], seed: int, progress: bool,
                 device: torch.device | str | None) -> None:
        super().__init__(None)  # pixels only: no frozen classifier involved
        self.image_shape = tuple(image_shape)
        self.seed = seed
        self.progress = progress
        self.device = None if device is None else torch.device(device)

    def fit(self, known: Observations, labels: torch.Tensor | None = None) -> "PixelDetector":
        """Train on all known images together; class labels are not used."""
        return self.fit_pixels(self._pixels(known))

    def score(self, batch: Observations) -> torch.Tensor:
        return self.score_pixels(self._pixels(batch)).float().to(batch.images.device)

    @abstractmethod
    def fit_pixels(self, images: torch.Tensor) -> "PixelDetector":
        """Train on known images [N, C, H, W] already on the compute device."""

    @abstractmethod
    def score_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Novelty scores [B] of images on the compute device; higher = more novel."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The trained networks and statistics (tensors on the host), enough to score after a load."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...

    def _pixels(self, batch: Observations) -> torch.Tensor:
        if batch.images is None:
            raise InputError(f"{self.name} looks at pixels, but the Observations carry no images")
        if tuple(batch.images.shape[1:]) != self.image_shape:
            raise InputError(f"{self.name} was built for images {self.image_shape}, got batch.images "
                             f"{tuple(batch.images.shape[1:])}")
        return batch.images.to(self.device or batch.images.device, torch.float32)


class NetworkPixelDetector(PixelDetector):
    """A pixel detector whose whole trained state is one `network` (drocc, rotation): saved as its
    weights, tagged with the detector's name so a state of another kind is refused on load."""

    network: nn.Module
    fitted: bool = False

    def require_fitted(self) -> None:
        if not self.fitted:
            raise StateError(f"{self.name} is not fitted yet: call fit(known, labels) first")

    def state_dict(self) -> dict[str, Any]:
        if not self.fitted:
            raise StateError(f"{self.name} is not fitted yet: nothing to save")
        return {"variant": self.name, "weights": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("variant") != self.name:
            raise StateError(f"saved detector is {state.get('variant')!r}, not a {self.name} detector")
        try:
            self.network.load_state_dict(state["weights"])
        except (RuntimeError, KeyError) as exc:
            raise StateError(f"saved {self.name} weights do not fit this config: {exc}") from None
        self.fitted = True
