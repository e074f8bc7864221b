"""A fitted tied-covariance Gaussian per class: the object scoring runs against.

Fitting happens in float64 (calibration/moments, calibration/precision); the fitted means and
precision are stored in float32 because that is what the scoring kernels consume on device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibration.moments import ClassMoments
from calibration.precision import safe_precision, shrink
from edge_runtime.errors import InputError, StateError
from kernels.reference import mahalanobis_scores


@dataclass
class TiedGaussian:
    """Class means [C, K] and one shared precision [K, K], float32.

    `method` names the shrinkage; `inverse` says whether the precision came from Cholesky or,
    for a singular covariance, the pseudo-inverse.
    """

    means: torch.Tensor
    precision: torch.Tensor
    method: str
    inverse: str = "cholesky"

    def __post_init__(self) -> None:
        if self.means.ndim != 2 or self.precision.shape != (self.means.shape[1], self.means.shape[1]):
            raise InputError(
                "TiedGaussian needs means [C, K] and precision [K, K], "
                f"got {tuple(self.means.shape)} and {tuple(self.precision.shape)}"
            )

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def score(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each row of x [B, K] to its label's mean, [B]."""
        return mahalanobis_scores(x.to(self.means.dtype), self.means, labels, self.precision)

    def min_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance to the closest class mean [B], that class [B]).

        The closest class comes from the expanded form x'Px - 2x'P mu_c + mu_c'P mu_c (one GEMM
        for all classes); the returned distance is then recomputed directly for that class, so it
        does not suffer the expansion's cancellation near a mean.
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InputError(f"x must be [B, {self.dim}], got {tuple(x.shape)}")
        x = x.to(self.means.dtype)
        projected_means = self.means @ self.precision
        cross = x @ projected_means.T
        mean_terms = (projected_means * self.means).sum(dim=1)
        closest = (mean_terms - 2 * cross).argmin(dim=1)
        return self.score(x, closest), closest

    def to(self, device: torch.device | str) -> "TiedGaussian":
        return TiedGaussian(self.means.to(device), self.precision.to(device), self.method, self.inverse)

    def state_dict(self) -> dict[str, torch.Tensor | str]:
        """Tensors and strings only, so safetensors can hold the tensors and the strings as metadata."""
        return {
            "means": self.means.cpu().contiguous(),
            "precision": self.precision.cpu().contiguous(),
            "method": self.method,
            "inverse": self.inverse,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor | str]) -> "TiedGaussian":
        missing = [key for key in ("means", "precision", "method", "inverse") if key not in state]
        if missing:
            raise StateError(f"TiedGaussian state lacks {', '.join(missing)}")
        means, precision = state["means"], state["precision"]
        if not isinstance(means, torch.Tensor) or not isinstance(precision, torch.Tensor):
            raise StateError("TiedGaussian state 'means' and 'precision' must be tensors")
        if means.ndim != 2 or tuple(precision.shape) != (means.shape[1], means.shape[1]):
            raise StateError(
                f"TiedGaussian state shapes disagree: means {tuple(means.shape)}, precision {tuple(precision.shape)}"
            )
        return cls(means.float(), precision.float(), str(state["method"]), str(state["inverse"]))


def fit_tied_gaussian(moments: ClassMoments, shrinkage: str, ridge: float) -> TiedGaussian:
    """Shrink the pooled covariance, invert it safely, and keep float32 copies for scoring."""
    absent = torch.nonzero(moments.counts == 0).flatten().tolist()
    if absent:
        raise StateError(f"cannot fit a tied Gaussian: classes {absent} have no samples")
    precision, inverse = safe_precision(shrink(moments, shrinkage, ridge))
    return TiedGaussian(moments.means.float(), precision.float(), shrinkage, inverse)
