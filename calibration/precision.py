"""From pooled class moments to a well-conditioned covariance and its inverse, in float64.

Gradient vectors live in a C*(D+1) space whose covariance is singular by construction (the softmax
residual sums to zero over classes), and feature covariances are often near-singular when K is
close to N; so the covariance is shrunk first and inverted defensively second.
"""

from __future__ import annotations

import torch

from calibration.moments import ClassMoments
from edge_runtime.errors import ConfigError, InputError

SHRINKAGE_METHODS = ("ledoit_wolf", "oas", "ridge")
DEFAULT_RCOND = 1e-10


def shrink(moments: ClassMoments, method: str, ridge: float) -> torch.Tensor:
    """Shrunk pooled covariance [K, K] float64.

    "ledoit_wolf": (1 - s) S + s mu I with Ledoit & Wolf's intensity s computed exactly from the
    streamed sums; "oas": the same target with Chen et al.'s OAS intensity; "ridge": S + ridge *
    mean(diag S) * I. `ridge` is used by "ridge" only, so the two estimators stay the published ones.
    """
    if method not in SHRINKAGE_METHODS:
        raise ConfigError(f"shrinkage must be one of {', '.join(SHRINKAGE_METHODS)}, got {method!r}")
    if ridge < 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}")
    covariance = moments.covariance
    mean_variance = torch.diagonal(covariance).mean()
    if method == "ridge":
        intensity, target = 0.0, ridge * mean_variance
    else:
        if method == "ledoit_wolf":
            intensity = ledoit_wolf_intensity(covariance, moments.fourth_moment_sum, moments.total)
        else:
            intensity = oas_intensity(covariance, moments.total)
        target = intensity * mean_variance
    shrunk = (1.0 - intensity) * covariance
    shrunk.diagonal().add_(target)
    return shrunk


def ledoit_wolf_intensity(covariance: torch.Tensor, fourth_moment_sum: float, count: int) -> float:
    """Ledoit-Wolf (2004) shrinkage intensity towards mu*I, as scikit-learn computes it.

    With S = Z^T Z / n (Z the n centred samples): beta = (sum_i ||z_i||^4 / n - ||S||_F^2) / (p n),
    delta = ||S - mu I||_F^2 / p, intensity = min(beta, delta) / delta.
    """
    p = covariance.shape[0]
    mu = torch.diagonal(covariance).mean()
    frobenius2 = (covariance * covariance).sum()
    beta = (fourth_moment_sum / count - frobenius2) / (p * count)
    delta = (frobenius2 - p * mu * mu) / p
    if float(delta) <= 0.0:
        return 0.0
    return float(torch.clamp(torch.minimum(beta, delta) / delta, 0.0, 1.0))


def oas_intensity(covariance: torch.Tensor, count: int) -> float:
    """Oracle-approximating shrinkage intensity (Chen et al. 2010, eq. 23).

    Written as scikit-learn does: (tr(S^2) + tr(S)^2) / ((n + 1)(tr(S^2) - tr(S)^2 / p)), capped
    at 1, i.e. eq. 23 without its O(1/p) correction terms.
    """
    p = covariance.shape[0]
    trace_sq = (covariance * covariance).sum()
    sq_trace = torch.diagonal(covariance).sum() ** 2
    denominator = (count + 1) * (trace_sq - sq_trace / p)
    if float(denominator) <= 0.0:
        return 1.0
    return float(torch.clamp((trace_sq + sq_trace) / denominator, max=1.0))


def safe_precision(cov: torch.Tensor, rcond: float = DEFAULT_RCOND) -> tuple[torch.Tensor, str]:
    """Inverse of a symmetric PSD covariance in float64, and how it was obtained.

    Cholesky when it succeeds and the 1-norm condition number stays below 1 / rcond
    ("cholesky"); otherwise the eigendecomposition pseudo-inverse, dropping eigenvalues below
    rcond * the largest ("pinv"), which is the right answer for a singular covariance: null
    directions carry no IDD variation to measure against.
    """
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise InputError(f"cov must be a square matrix, got {tuple(cov.shape)}")
    if not torch.isfinite(cov).all():
        raise InputError("cov holds non-finite values")
    symmetric = cov.to(torch.float64)
    symmetric = (symmetric + symmetric.T) / 2
    factor, info = torch.linalg.cholesky_ex(symmetric)
    if int(info) == 0:
        precision = torch.cholesky_inverse(factor)
        condition = torch.linalg.matrix_norm(symmetric, 1) * torch.linalg.matrix_norm(precision, 1)
        if torch.isfinite(condition) and float(condition) * rcond < 1.0:
            return ((precision + precision.T) / 2).contiguous(), "cholesky"
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)
    keep = eigenvalues > rcond * eigenvalues.abs().max()
    basis = eigenvectors[:, keep]
    precision = (basis / eigenvalues[keep]) @ basis.T
    return ((precision + precision.T) / 2).contiguous(), "pinv"
