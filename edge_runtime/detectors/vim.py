"""ViM, virtual-logit matching (Wang et al., CVPR 2022): feature residual plus energy.

Known features concentrate in a principal subspace (around the origin o = -pinv(W) b, where the
final layer's logits vanish); the norm of what lies outside it is a class-agnostic novelty signal
the logits cannot see. ViM scales that residual to the known samples' mean max logit, as a
"virtual logit" of a novel class, and compares it with the energy of the real logits.
"""

from __future__ import annotations

import torch

from edge_runtime.detectors.base import Detector, Observations, checked_features
from edge_runtime.errors import ConfigError, InputError, StateError
from edge_runtime.models.base import FrozenClassifier


class ViMDetector(Detector):
    """Score = alpha * ||(a - o) P_residual|| - logsumexp(logits).

    The principal subspace has `dim` dimensions (None: half the feature width, the rule the
    authors' and OpenOOD's code use for features narrower than 768) and is fitted, with alpha, on
    the known samples alone.
    """

    name = "vim"

    def __init__(self, classifier: FrozenClassifier, *, dim: int | None = None) -> None:
        super().__init__(classifier)
        width = classifier.feature_dim
        self.dim = width // 2 if dim is None else dim
        if not 0 < self.dim < width:
            raise ConfigError(f"vim principal dim must be in [1, {width - 1}] for {width}-wide features, got {self.dim}")
        self.origin: torch.Tensor | None = None
        self.residual_basis: torch.Tensor | None = None
        self.alpha: float | None = None

    def fit(self, known: Observations, labels: torch.Tensor) -> "ViMDetector":
        """Origin, residual subspace and alpha from the known samples (labels unused), in float64."""
        features = checked_features(known, self.classifier.feature_dim).double()
        if len(features) < 2:
            raise InputError(f"vim: fit() needs at least 2 known samples, got {len(features)}")
        weight, bias = self.classifier.final_affine(torch.float64, features.device)
        origin = -torch.linalg.pinv(weight) @ bias
        centred = features - origin
        _eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(centred))  # ascending
        residual_basis = eigenvectors[:, : features.shape[1] - self.dim]
        mean_max_logit = float(known.logits.double().amax(dim=1).mean())
        mean_residual = float((centred @ residual_basis).norm(dim=1).mean())
        if not (mean_max_logit > 0 and mean_residual > 0):
            raise InputError(f"vim: the known samples' mean max logit ({mean_max_logit:.4g}) and mean residual norm "
                             f"({mean_residual:.4g}) must both be positive to match the virtual logit to the logits")
        self.origin, self.residual_basis = origin.float(), residual_basis.float()
        self.alpha = mean_max_logit / mean_residual
        return self

    def score(self, batch: Observations) -> torch.Tensor:
        if self.origin is None or self.residual_basis is None or self.alpha is None:
            raise StateError("vim: score() called before fit()")
        features = checked_features(batch, len(self.origin)).float()
        residual = ((features - self.origin.to(features.device)) @ self.residual_basis.to(features.device)).norm(dim=1)
        return self.alpha * residual - torch.logsumexp(batch.logits.float(), dim=1)
